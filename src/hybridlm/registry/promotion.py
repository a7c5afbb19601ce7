"""Moving an alias: promotion through a gate, and rollback to the version it held before."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.registry.gates import load_gate, run_gate
from hybridlm.registry.store import Move, Registry


def promote(registry: Registry, name: str, version: int, alias: str, gate: Path | None) -> tuple[Move, list[dict]]:
    """Run the gate (the hashes always; the gate file's checks when given) and move `alias` to
    `version` if every check passed. A failing gate is recorded in the alias's history and refused
    (UserError with the first failing check's reason); the alias stays where it was."""
    checks = load_gate(gate) if gate is not None else []  # a bad gate file changes nothing
    candidate = registry.version(name, version)
    held = registry.holder(name, alias)
    holder = registry.version(name, held) if held is not None else None
    outcomes = [o.to_dict() for o in run_gate(checks, candidate, holder)]
    failed = [o for o in outcomes if not o["passed"]]
    if failed:
        registry.move(name, alias, version, "promote-refused", gate=outcomes, reason=failed[0]["detail"])
        raise UserError(f"promotion of {candidate.label} to @{alias} refused: {failed[0]['detail']}")
    return registry.move(name, alias, version, "promote", gate=outcomes), outcomes


def rollback(registry: Registry, name: str, alias: str, *, reason: str = "", action: str = "rollback") -> Move:
    """Point `alias` back at the version it held before its current one."""
    if action not in ("rollback", "auto-rollback"):
        raise UserError(f"a rollback is recorded as rollback or auto-rollback (got {action!r})")
    return registry.move(name, alias, registry.rollback_target(name, alias), action, reason=reason)
