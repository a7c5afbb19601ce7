"""The chat template: conversations -> token ids, with the mask of the tokens that carry loss.

Every message is `<|role|> content <|end|>`; a generation prompt is `<|assistant|>`. The same
template is written as Jinja into tokenizer_config.json (the place Hugging Face tools read it),
so `apply_chat_template` elsewhere renders the same text. Role and end markers enter by id, never by
matching text, so a message that contains "<|end|>" stays plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridlm.errors import UserError

if TYPE_CHECKING:
    from hybridlm.tokenizer.text_tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")
JINJA_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"message role must be one of {', '.join(ROLES)} (got {self.role!r})")


def render_chat(
    tokenizer: TextTokenizer, messages: list[Message], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether it is assistant output (content and
    its end marker: what instruction tuning trains on; the role marker is given, not predicted)."""
    ids: list[int] = []
    trained: list[bool] = []
    for message in messages:
        body = tokenizer.encode(message.content) + [tokenizer.special_ids["end"]]
        is_reply = message.role == "assistant"
        ids += [tokenizer.special_ids[message.role], *body]
        trained += [False] + [is_reply] * len(body)
    if add_generation_prompt:
        ids.append(tokenizer.special_ids["assistant"])
        trained.append(False)
    return ids, trained
