"""`hybridlm eval human serve`: the rating page, plain HTML forms (no script), one card per screen.

The page shows the prompt and the reply or replies as "Reply 1" / "Reply 2", never which run
wrote them. A rater gives a name once (kept in the address), rates fluency, coherence and
helpfulness, and gets the next card they have not rated. Bad form input gets a 400 page saying
what to fix; nothing is stored from it. Needs the serve extra (FastAPI, uvicorn).
"""

from __future__ import annotations

from html import escape
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from hybridlm.errors import UserError
from hybridlm.eval.human.store import CRITERIA, PAIRWISE_CHOICES, RATING_SCALE, Card, Study

STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
         "pre{white-space:pre-wrap;background:#f4f4f4;padding:.75rem;border-radius:.3rem}"
         ".replies{display:flex;gap:1rem}.replies>div{flex:1}fieldset{margin:.5rem 0}")
CHOICE_LABELS = {"first": "Reply 1 is better", "second": "Reply 2 is better", "tie": "About the same"}


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def name_form() -> str:
    return _page("Rate replies", "<h1>Rate replies</h1><form method=get action='/'><label>Your name "
                 "<input name=rater required maxlength=64></label> <button>Start</button></form>")


def _criterion_inputs(study: Study) -> str:
    fields = []
    for criterion in CRITERIA:
        if study.mode == "pairwise":
            options = "".join(f"<label><input type=radio name={criterion} value={v} required> {CHOICE_LABELS[v]}</label> "
                              for v in PAIRWISE_CHOICES)
        else:
            options = "".join(f"<label><input type=radio name={criterion} value={v} required> {v}</label> "
                              for v in RATING_SCALE)
        fields.append(f"<fieldset><legend>{criterion.capitalize()}</legend>{options}</fieldset>")
    return "".join(fields)


def card_page(study: Study, card: Card, rater: str) -> str:
    done, total = study.progress(rater)
    prompt = "".join(f"<p><b>{escape(m['role'])}</b></p><pre>{escape(m['content'])}</pre>" for m in card.prompt)
    if card.second_reply is None:
        replies = f"<h2>Reply</h2><pre>{escape(card.first_reply)}</pre>"
        scale = "<p>Rate the reply from 1 (poor) to 5 (excellent) on each criterion.</p>"
    else:
        replies = (f"<div class=replies><div><h2>Reply 1</h2><pre>{escape(card.first_reply)}</pre></div>"
                   f"<div><h2>Reply 2</h2><pre>{escape(card.second_reply)}</pre></div></div>")
        scale = "<p>Which reply is better on each criterion?</p>"
    return _page(f"Card {card.id}", f"<p>{escape(rater)}: {done} of {total} rated</p><h1>Prompt</h1>{prompt}{replies}"
                 f"<form method=post action='/rate'><input type=hidden name=card_id value={card.id}>"
                 f"<input type=hidden name=rater value=\"{escape(rater)}\">{scale}{_criterion_inputs(study)}"
                 "<button>Save and go on</button></form>")


def done_page(rater: str, total: int) -> str:
    return _page("Done", f"<h1>Thank you, {escape(rater)}</h1><p>You have rated all {total} cards.</p>")


def error_page(message: str, rater: str | None) -> str:
    back = f"<p><a href='/?rater={quote(rater)}'>Back to the card</a></p>" if rater else "<p><a href='/'>Back</a></p>"
    return _page("Not saved", f"<h1>Not saved</h1><p>{escape(message)}</p>{back}")


def parse_rating(body: bytes) -> tuple[int, str, dict[str, str]]:
    """(card id, rater, criterion -> value) from the form; a UserError says what is wrong."""
    fields = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", errors="replace")).items()}
    card_id, rater = fields.pop("card_id", ""), fields.pop("rater", "")
    if not card_id.isdigit():
        raise UserError("the form lacks a card number; reload the page")
    return int(card_id), rater, fields


def create_page_app(study: Study) -> FastAPI:
    app = FastAPI(title="hybridlm human evaluation", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def next_card(rater: str = "") -> HTMLResponse:
        rater = rater.strip()
        if not rater:
            return HTMLResponse(name_form())
        card = study.next_card(rater)
        if card is None:
            return HTMLResponse(done_page(rater, study.progress(rater)[1]))
        return HTMLResponse(card_page(study, card, rater))

    @app.post("/rate", response_model=None)
    async def rate(request: Request) -> HTMLResponse | RedirectResponse:
        rater = None
        try:
            card_id, rater, values = parse_rating(await request.body())
            study.rate(card_id, rater, values)
        except UserError as exc:
            return HTMLResponse(error_page(str(exc), rater or None), status_code=400)
        return RedirectResponse(f"/?rater={quote(rater.strip())}", status_code=303)

    return app


def serve_study(study: Study, host: str, port: int) -> None:
    import uvicorn

    print(f"rating page for {study.path}: http://{host}:{port}/", flush=True)
    uvicorn.run(create_page_app(study), host=host, port=port, log_level="warning")
