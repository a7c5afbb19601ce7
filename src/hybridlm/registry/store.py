"""The model registry on MLflow: named models, numbered versions that point at run directories,
aliases (production, staging, ...) and the history of every alias move.

A version indexes its run directory in place (the run directory is self-describing; the registry
does not copy weights): its source is the directory's absolute path and its tags hold the code
version, the tokenizer and data hashes from lineage.json, and the sha256 of the run's
manifest.json, so a run changed after registration is refused (`verify`). Each version also gets
an MLflow run (experiment "hybridlm-registry") holding its model card and lineage as artifacts.

MLflow keeps no alias history, so every move is a tag on the registered model,
`hybridlm.alias.ALIAS.NNNNNN` = {time, who, action, from, to, gate, reason}: the registry store
itself holds it, a team's tracking server included.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import read_json, sha256_file
from hybridlm.run import MANIFEST, verify_manifest
from hybridlm.train.tracking import artifact_root, mlflow_client

DEFAULT_DIR = "hybridlm-registry"
EXPERIMENT = "hybridlm-registry"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def registry_uri(given: str | None) -> str:
    """--registry, else $HYBRIDLM_REGISTRY, else a SQLite file under ./hybridlm-registry/."""
    uri = given or os.environ.get("HYBRIDLM_REGISTRY", "")
    if uri:
        return uri
    Path(DEFAULT_DIR).mkdir(exist_ok=True)
    return f"sqlite:///{Path(DEFAULT_DIR).resolve() / 'registry.db'}"


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    run_dir: Path
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()
    run_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Move:
    """One entry of an alias's history."""

    time: str
    who: str
    action: str  # set | promote | promote-refused | rollback | auto-rollback
    from_version: int | None
    to_version: int | None
    gate: list[dict] = field(default_factory=list)
    reason: str = ""

    @property
    def moved(self) -> bool:
        return self.action != "promote-refused"

    def to_dict(self) -> dict:
        return {"time": self.time, "who": self.who, "action": self.action, "from": self.from_version,
                "to": self.to_version, "gate": self.gate, "reason": self.reason}


class Registry:
    """Versions, aliases and their history in one MLflow registry store."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = registry_uri(uri)
        self.client = mlflow_client(self.uri)  # a clear error when the [mlops] extra is missing
        from mlflow.exceptions import MlflowException

        self._errors = MlflowException
        try:
            self.client.search_registered_models(max_results=1)  # reachable, and its tables exist
        except MlflowException as exc:
            raise UserError(f"cannot reach the registry {self.uri}: {str(exc).splitlines()[0]}; "
                            "check --registry") from None

    # ---- versions -------------------------------------------------------------------------

    def register(self, run_dir: Path, name: str, card: str) -> Version:
        """The next version of `name` (created when new), pointing at the finished `run_dir`."""
        if not _NAME.match(name):
            raise UserError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 100)")
        run_dir = Path(run_dir).resolve()
        check_finished(run_dir)
        tags = version_tags(run_dir)
        if not self._exists(name):
            self.client.create_registered_model(name)
        run = self.client.create_run(self._experiment(), run_name=f"{name}-registration",
                                     tags={"hybridlm.run_dir": str(run_dir)})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            self.client.log_artifact(run.info.run_id, str(Path(tmp) / "README.md"))
        if (run_dir / "lineage.json").is_file():
            self.client.log_artifact(run.info.run_id, str(run_dir / "lineage.json"))
        self.client.set_terminated(run.info.run_id)
        created = self.client.create_model_version(name, source=str(run_dir), run_id=run.info.run_id, tags=tags)
        return self.version(name, int(created.version))

    def version(self, name: str, version: int) -> Version:
        self._require(name)
        try:
            found = self.client.get_model_version(name, str(version))
        except self._errors:
            known = ", ".join(str(v.version) for v in self.versions(name)) or "none"
            raise UserError(f"{name} has no version {version} (versions: {known})") from None
        return _version(found)

    def versions(self, name: str) -> list[Version]:
        self._require(name)
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted((_version(v) for v in found), key=lambda v: v.version)

    def names(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models())

    def resolve(self, ref: str) -> Version:
        """NAME@ALIAS, NAME/VERSION, or NAME (its latest version)."""
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return self.version(name, self.alias_version(name, alias))
        if "/" in ref:
            name, number = ref.split("/", 1)
            if not number.isdigit():
                raise UserError(f"{ref!r}: a version is a number (NAME/3)")
            return self.version(name, int(number))
        versions = self.versions(ref)
        if not versions:
            raise UserError(f"{ref} has no versions yet; register one")
        return versions[-1]

    def card(self, version: Version) -> str:
        if version.run_id is None:
            return ""
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(version.run_id, "README.md", tmp)
            return Path(path).read_text(encoding="utf-8")

    # ---- aliases --------------------------------------------------------------------------

    def alias_version(self, name: str, alias: str) -> int:
        self._require(name)
        aliases = self.client.get_registered_model(name).aliases
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise UserError(f"{name} has no alias {alias!r} (aliases: {known}); set one with `registry alias set`")
        return int(aliases[alias])

    def holder(self, name: str, alias: str) -> int | None:
        return int(v) if (v := self.client.get_registered_model(name).aliases.get(alias)) else None

    def move(self, name: str, alias: str, to: int, action: str, *, gate: list[dict] | None = None,
             reason: str = "", who: str | None = None) -> Move:
        """Point `alias` at version `to` (or only record a refused promotion), and write the history entry."""
        self.version(name, to)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", alias) or re.fullmatch(r"v\d+", alias):
            raise UserError(f"alias {alias!r} must start with a letter, hold letters, digits, '_' or '-', "
                            "and not look like a version (v1)")
        entry = Move(time.strftime("%Y-%m-%dT%H:%M:%S%z"), who or _who(), action, self.holder(name, alias), to,
                     gate or [], reason)
        if entry.moved:
            self.client.set_registered_model_alias(name, alias, str(to))
        key = f"hybridlm.alias.{alias}.{len(self.history(name, alias)) + 1:06d}"
        self.client.set_registered_model_tag(name, key, json.dumps(entry.to_dict()))
        return entry

    def history(self, name: str, alias: str) -> list[Move]:
        self._require(name)
        prefix = f"hybridlm.alias.{alias}."
        tags = self.client.get_registered_model(name).tags
        entries = [json.loads(tags[key]) for key in sorted(k for k in tags if k.startswith(prefix))]
        return [Move(e["time"], e["who"], e["action"], e["from"], e["to"], e.get("gate", []), e.get("reason", ""))
                for e in entries]

    def rollback_target(self, name: str, alias: str) -> int:
        """The version `alias` pointed at before its current one: the `from` of the latest move
        (not itself a rollback) that brought it to where it is."""
        current = self.alias_version(name, alias)
        for entry in reversed(self.history(name, alias)):
            if entry.from_version == current:
                continue  # a move that left it where it was (setting or promoting the version it held)
            if entry.moved and entry.to_version == current and entry.action not in ("rollback", "auto-rollback"):
                if entry.from_version is None:
                    break
                return entry.from_version
        raise UserError(f"{name}@{alias} has no earlier version to roll back to (it was first set to {current})")

    # ---- helpers --------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        try:
            self.client.get_registered_model(name)
            return True
        except self._errors:
            return False

    def _require(self, name: str) -> None:
        if not self._exists(name):
            known = ", ".join(self.names()) or "none yet"
            raise UserError(f"no model named {name!r} in the registry (models: {known}); register it first")

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        return found.experiment_id if found else self.client.create_experiment(
            EXPERIMENT, artifact_location=artifact_root(self.uri))


def check_finished(run_dir: Path) -> None:
    """A registrable run: a finished model whose files match their manifest."""
    if not (run_dir / "model.safetensors").is_file() or not (run_dir / MANIFEST).is_file():
        raise UserError(f"{run_dir} is not a finished run (no model.safetensors / {MANIFEST}); "
                        "finish training it, or give the run directory itself")
    verify_manifest(run_dir)


def version_tags(run_dir: Path) -> dict[str, str]:
    """Tags a version carries: what it was made from, and the hash that pins its files."""
    lineage = read_json(run_dir / "lineage.json", "lineage") if (run_dir / "lineage.json").is_file() else {}
    tags = {"hybridlm.run_dir": str(run_dir), "hybridlm.manifest_sha256": sha256_file(run_dir / MANIFEST),
            "hybridlm.code_version": lineage.get("code_version", "unknown"),
            "hybridlm.tokenizer_sha256": lineage.get("tokenizer_sha256") or "unknown",
            "hybridlm.parent_run": lineage.get("parent_run") or ""}
    for i, source in enumerate(lineage.get("sources", [])):
        tags[f"hybridlm.data.{i}.spec"] = str(source.get("spec"))
        tags[f"hybridlm.data.{i}.sha256"] = str(source.get("sha256") or "unhashed (built-in source)")
    return tags


def verify(version: Version) -> None:
    """Refuse a version whose run directory changed since it was registered."""
    run_dir = version.run_dir
    check_finished(run_dir)
    recorded = version.tags.get("hybridlm.manifest_sha256")
    if recorded and sha256_file(run_dir / MANIFEST) != recorded:
        raise UserError(f"{version.label}: {run_dir / MANIFEST} changed after registration (its sha256 differs "
                        "from the registry's); restore the run or register it again")


def _version(found) -> Version:
    return Version(found.name, int(found.version), Path(found.source), dict(found.tags), tuple(found.aliases or ()),
                   found.run_id)


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
