"""A registry alias as the server's model source (`hybridlm serve --model models:/NAME@ALIAS`):
the server follows the alias by hot swap and, under its rollback policy, moves it back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.registry.promotion import rollback
from hybridlm.registry.store import Registry, verify

SCHEME = "models:/"


def parse_model_uri(uri: str) -> tuple[str, str]:
    """models:/NAME@ALIAS -> (NAME, ALIAS) (MLflow's form of a model URI)."""
    rest = uri.removeprefix(SCHEME)
    name, _, alias = rest.partition("@")
    if not uri.startswith(SCHEME) or not name or not alias or "/" in rest:
        raise UserError(f"{uri!r}: serve a registry alias as models:/NAME@ALIAS")
    return name, alias


@dataclass
class AliasSource:
    """The version NAME@ALIAS points at, checked against the registry's hashes before it loads."""

    registry: Registry
    name: str
    alias: str
    follows: bool = True

    @classmethod
    def from_uri(cls, uri: str, registry_uri: str | None) -> AliasSource:
        name, alias = parse_model_uri(uri)
        source = cls(Registry(registry_uri), name, alias)
        source.current()  # an unknown name or alias fails here, before anything loads
        return source

    def current(self) -> tuple[str, Path]:
        version = self.registry.resolve(f"{self.name}@{self.alias}")
        return version.label, version.run_dir

    def check(self, label: str, run_dir: Path) -> None:
        verify(self.registry.version(self.name, int(label.rsplit("/", 1)[1])))

    def roll_back(self, label: str, reason: str) -> str:
        """Move the alias back from `label`, unless it already left that version (an operator, or
        another replica, moved it meanwhile): then nothing changes."""
        current = self.registry.alias_version(self.name, self.alias)
        if f"{self.name}/{current}" != label:
            raise UserError(f"{self.name}@{self.alias} no longer points at {label} (it is at {current}); not rolled back")
        move = rollback(self.registry, self.name, self.alias, reason=f"{label}: {reason}", action="auto-rollback")
        return f"{self.name}/{move.to_version}"
