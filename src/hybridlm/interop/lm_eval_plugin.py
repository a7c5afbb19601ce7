"""lm-evaluation-harness model `hybridlm`: `--model hybridlm --model_args path=RUN[,batch_size=N,dtype=fp32]`.

The three request types are answered by eval/scoring.py's Scorer, the code `hybridlm eval run`
scores with, so both tools give the same numbers on the same prompts. lm-eval finds the model
through the "lm_eval.models" entry point (pyproject.toml) where it reads entry points, and through
interop/lm_eval_startup.py where it does not (0.4.x); importing this module registers it too.
"""

from __future__ import annotations

from pathlib import Path

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"the lm-evaluation-harness plugin needs lm_eval: pip install 'hybridlm[lmeval]' ({exc})") from exc

from hybridlm.eval.scoring import Scorer

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until requests


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes --batch_size through as int or text ("auto", "auto:N"); auto means our default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return int(value)


@register_model("hybridlm")
class HybridLMEval(LM):
    """A hybridlm run directory as an lm-eval model (greedy generation only)."""

    def __init__(self, path: str, batch_size: int | str | None = None, dtype: str = "auto", **unused: object) -> None:
        super().__init__()
        self.scorer = Scorer.from_path(Path(path), batch_size=_batch_size(batch_size), dtype=dtype)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HybridLMEval:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> HybridLMEval:
        """model_args win over the CLI's --batch_size/--device (lm-eval's base class passes both and
        fails on the duplicate keyword)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([(context, continuation) for context, continuation in
                                          (request.args for request in requests)])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([request.args[0] for request in requests])

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding per request, cut at its `until` strings; sampling settings are ignored and
        max_gen_toks is capped at the context less one prompt token."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            stop = [until] if isinstance(until, str) else list(until)
            max_new = min(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.scorer.context - 1)
            outputs.append(self.scorer.generate_until([context], max_new, stop)[0])
        return outputs
