"""The Scorer against a direct computation with the model (log_softmax, gather), batch-size
independence, lm-eval's tokenization split, rolling windows and greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm.errors import UserError
from hybridlm.eval.scoring import Scorer, rolling_windows
from hybridlm.run import load_run

REQUESTS = [
    ("Paragraph 3: the value of x3 is", " 8."),
    ("Paragraph 12: the value of x12 is", " 6."),
    ("Paragraph", " 40: the value of x40 is 7."),
    ("", "Paragraph 5: the value"),
    ("Paragraph 7: the value of x7 is ", "10."),  # trailing space moves to the continuation
    ("The", " value"),
    ("Paragraph 100: the value of x100 is 11.\n\nParagraph 101: the value of", " x101 is 5."),
]


@pytest.fixture(scope="module")
def scorer(tiny_run) -> Scorer:
    return Scorer(load_run(tiny_run), batch_size=4, dtype="fp32")


@torch.no_grad()
def direct(scorer: Scorer, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded forward over the (left-truncated) joined ids; log_softmax and gather."""
    ids = (context + continuation)[-(scorer.context + 1) :]
    logp_TV = F.log_softmax(scorer.model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)
    rows = logp_TV[len(ids) - 1 - len(continuation) :]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_encode_pair_encodes_whole_and_splits_like_hflm(scorer):
    tok = scorer.tokenizer
    context, continuation = scorer.encode_pair("Paragraph 3: the value of x3 is", " 8.")
    assert context == [tok.eos_id, *tok.encode("Paragraph 3: the value of x3 is")]
    assert context + continuation == [tok.eos_id, *tok.encode("Paragraph 3: the value of x3 is 8.")]
    assert scorer.encode_pair("the value ", "is") == scorer.encode_pair("the value", " is")
    assert scorer.encode_pair("", "the value") == ([tok.eos_id], tok.encode("the value"))


def test_loglikelihood_equals_a_direct_computation(scorer):
    results = scorer.loglikelihood(REQUESTS)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, results):
        want_ll, want_greedy = direct(scorer, *scorer.encode_pair(context, continuation))
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
        assert ll < 0


def test_results_do_not_depend_on_the_batch_size(scorer):
    reference = scorer.loglikelihood(REQUESTS)
    for batch_size in (1, 3, 16):
        other = Scorer(scorer.run, batch_size=batch_size, dtype="fp32").loglikelihood(REQUESTS)
        assert [g for _, g in other] == [g for _, g in reference]
        assert [ll for ll, _ in other] == pytest.approx([ll for ll, _ in reference], rel=1e-6, abs=1e-4)


def test_long_contexts_are_left_truncated(scorer):
    context = "".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(60))
    pair = scorer.encode_pair(context, " 4.")
    assert len(pair[0]) > scorer.context
    [(ll, greedy)] = scorer.loglikelihood([(context, " 4.")])
    want_ll, want_greedy = direct(scorer, *pair)
    assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy


def test_continuations_longer_than_the_context_are_scored_in_pieces(scorer):
    text = "".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(50))
    context, continuation = scorer.encode_pair("Paragraph", " " + text)
    assert len(continuation) > 2 * scorer.context
    pieces = [(context + continuation[:s], continuation[s : s + scorer.context])
              for s in range(0, len(continuation), scorer.context)]
    want = [direct(scorer, c, x) for c, x in pieces]
    [(ll, greedy)] = scorer.loglikelihood([("Paragraph", " " + text)])
    assert ll == pytest.approx(sum(w for w, _ in want), abs=1e-3) and greedy == all(g for _, g in want)


def test_rolling_windows_tile_the_text_as_lm_eval_does():
    ids = list(range(1, 11))
    assert rolling_windows(ids, 0, 4) == [([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]), ([6, 7, 8], [9, 10])]
    assert rolling_windows([], 0, 4) == []
    for n in (1, 4, 5, 9, 23):
        windows = rolling_windows(list(range(n)), -1, 4)
        assert [t for _, cont in windows for t in cont] == list(range(n))
        assert all(len((c + x)[-5:-1]) <= 4 for c, x in windows)


def test_loglikelihood_rolling_short_and_long_texts(scorer):
    short = "Paragraph 9: the value of x9 is 11."
    [rolling] = scorer.loglikelihood_rolling([short])
    assert rolling == pytest.approx(scorer.loglikelihood([("", short)])[0][0], abs=1e-4)
    long_text = "".join(f"Paragraph {i}: the value of x{i} is {i * 7 % 13}.\n\n" for i in range(80))
    ids = scorer.tokenizer.encode(long_text)
    assert len(ids) > 2 * scorer.context
    want = sum(direct(scorer, c, x)[0] for c, x in rolling_windows(ids, scorer.tokenizer.eos_id, scorer.context))
    got = scorer.loglikelihood_rolling([short, long_text])
    assert got[0] == pytest.approx(rolling, abs=1e-4) and got[1] == pytest.approx(want, abs=1e-3)


@torch.no_grad()
def test_generate_until_is_greedy_and_stops(scorer):
    tok = scorer.tokenizer
    prompt = "Paragraph 21: the value"
    ids = [tok.eos_id, *tok.encode(prompt)]
    for _ in range(12):  # argmax decoding with full forwards, no cache
        ids.append(int(scorer.model(torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == tok.eos_id:
            break
    want = tok.decode(ids[len(tok.encode(prompt)) + 1 :])
    [text] = scorer.generate_until([prompt], 12, [])
    assert text == want
    stop = text.strip()[2:5]
    [cut] = scorer.generate_until([prompt], 12, [stop])
    assert cut == text[: text.find(stop)]


def test_bad_requests(scorer):
    with pytest.raises(UserError, match="at least one token"):
        scorer.loglikelihood([("Paragraph", "")])
    with pytest.raises(UserError, match="max new tokens"):
        scorer.generate_until(["x"], scorer.context, [])
    with pytest.raises(UserError, match="batch size"):
        Scorer(scorer.run, batch_size=0)
