"""Owner identity: which owner holds which work, and which owners are one and the same.

Royalties are paid to owners, but utilities are computed over *works* (or over owners as
registered). A registry maps each work to an owner and keeps display names. When an owner turns
out to have registered shell identities (the *splitting attack*: one owner split into many gains
under plain Shapley), ``merge(shell, into=owner)`` folds the shell into the real owner: its
works then resolve to that owner, :meth:`OwnerRegistry.partition` gives Owen/group-Shapley unions
that treat them as one, and period statements add the shell's past amounts to the owner.

Merging only changes attribution *from then on* for the split itself: amounts already computed
with the shells as separate players are summed, not recomputed. Value with Owen values or group
Shapley over the registry's partition to be robust to splitting in the first place.

Persisted as a small JSON document (``save``/``load``), never pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datavalue._files import unexpanded_home_problem
from datavalue.shapley._errors import (
    InvalidGameError,
    LedgerError,
    LedgerNotFoundError,
    UnknownOwnerError,
)
from datavalue.shapley.royalties._outpath import check_output_path, write_text_output
from datavalue.shapley.royalties._record_checks import check_id_text

__all__ = ["OwnerRegistry"]

_SCHEMA = "datavalue.shapley.owner-registry"


class OwnerRegistry:
    """Works -> owners, owner display names, and merges of shell owners.

    Example:
        >>> reg = OwnerRegistry()
        >>> reg.add_owner("alice", name="Alice Ltd"); reg.add_owner("shell-1")
        >>> reg.assign("w0", "alice"); reg.assign("w1", "shell-1"); reg.assign("w2", "alice")
        >>> reg.merge("shell-1", into="alice")
        >>> reg.owner_of("w1"), reg.name("shell-1")
        ('alice', 'Alice Ltd')
        >>> reg.partition(["w0", "w1", "w2"])
        (('alice',), ((0, 1, 2),))
    """

    def __init__(
        self,
        works: Mapping[str, str] | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        self._names: dict[str, str] = {}
        self._works: dict[str, str] = {}
        self._merged: dict[str, str] = {}
        for owner, name in (names or {}).items():
            self.add_owner(owner, name=name)
        for work, owner in (works or {}).items():
            if owner not in self._names:
                self.add_owner(owner)
            self.assign(work, owner)

    # ------------------------------------------------------------------ edits
    def add_owner(self, owner: str, *, name: str | None = None) -> None:
        """Register an owner id with an optional display name (re-adding updates the name)."""
        if not isinstance(owner, str) or not owner:
            raise InvalidGameError(f"owner ids must be non-empty strings; got {owner!r}.")
        check_id_text(owner, "the owner id")
        if name is not None and not isinstance(name, str):
            raise InvalidGameError(
                f"the display name of owner {owner!r} must be a string; got {name!r} of type "
                f"{type(name).__name__}. Nothing is converted: pass name='...' or leave it out."
            )
        if name is not None:
            check_id_text(name, f"the display name of owner {owner!r}")
        self._names[owner] = name if name is not None else self._names.get(owner, owner)

    def assign(self, work: str, owner: str) -> None:
        """Record that ``owner`` holds ``work`` (a work has exactly one owner)."""
        self._require(owner)
        if not isinstance(work, str) or not work:
            raise InvalidGameError(f"work ids must be non-empty strings; got {work!r}.")
        check_id_text(work, "the work id")
        current = self._works.get(work)
        if current is not None and current != owner:
            raise InvalidGameError(
                f"work {work!r} is already held by {current!r}; got a second owner {owner!r}. "
                "Merge the owners if they are the same entity."
            )
        self._works[work] = owner

    def merge(self, shell: str, *, into: str) -> None:
        """Fold owner ``shell`` into owner ``into`` (both must exist; no cycles)."""
        self._require(shell)
        self._require(into)
        target = self.resolve(into)
        if self.resolve(shell) == target:
            if shell == target:
                raise InvalidGameError(f"cannot merge owner {shell!r} into itself.")
            return
        self._merged[self.resolve(shell)] = target

    # ------------------------------------------------------------------ lookups
    def _require(self, owner: str) -> None:
        if owner not in self._names:
            raise UnknownOwnerError(
                f"unknown owner {owner!r}; registered owners are {sorted(self._names)[:10]}. "
                "Call add_owner first."
            )

    def resolve(self, owner: str) -> str:
        """The canonical owner after following merges (unknown ids resolve to themselves)."""
        seen = set()
        while owner in self._merged:
            if owner in seen:  # pragma: no cover - merge() prevents cycles
                raise LedgerError(f"owner merge cycle through {owner!r}.")
            seen.add(owner)
            owner = self._merged[owner]
        return owner

    def owner_of(self, work: str) -> str:
        """Canonical owner of a work."""
        try:
            return self.resolve(self._works[work])
        except KeyError:
            raise UnknownOwnerError(
                f"work {work!r} has no owner in the registry. Call assign(work, owner)."
            ) from None

    def name(self, owner: str) -> str:
        """Display name of an owner's canonical owner (the id itself when unknown)."""
        canonical = self.resolve(owner)
        return self._names.get(canonical, canonical)

    def owners(self) -> list[str]:
        """Canonical owners (merged shells excluded), sorted."""
        return sorted(o for o in self._names if o not in self._merged)

    def works_of(self, owner: str) -> list[str]:
        """All works resolving to ``owner`` (including those of merged shells), sorted."""
        target = self.resolve(owner)
        return sorted(w for w, o in self._works.items() if self.resolve(o) == target)

    def shells_of(self, owner: str) -> list[str]:
        """Owner ids merged (directly or transitively) into ``owner``."""
        target = self.resolve(owner)
        return sorted(o for o in self._merged if self.resolve(o) == target)

    def partition(
        self, works: Sequence[str]
    ) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
        """Group positions of ``works`` by canonical owner: ``(owners, unions)`` for Owen values.

        Owners appear in order of their first work.
        """
        groups: dict[str, list[int]] = {}
        for idx, work in enumerate(works):
            groups.setdefault(self.owner_of(work), []).append(idx)
        return tuple(groups), tuple(tuple(g) for g in groups.values())

    def resolve_all(self, owners: Iterable[str]) -> list[str]:
        """``resolve`` applied to each id."""
        return [self.resolve(o) for o in owners]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "schema": _SCHEMA,
            "version": 1,
            "names": dict(sorted(self._names.items())),
            "works": dict(sorted(self._works.items())),
            "merged": dict(sorted(self._merged.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OwnerRegistry:
        """Inverse of :meth:`to_dict`."""
        if d.get("schema") != _SCHEMA:
            raise LedgerError(
                f"not an owner registry (expected schema {_SCHEMA!r}); got {d.get('schema')!r}."
            )
        bad = [k for k in ("names", "works", "merged") if not isinstance(d.get(k, {}), Mapping)]
        if bad:
            raise LedgerError(f"owner registry entries {bad} must be JSON objects (name -> name); got "
                              f"{[type(d[k]).__name__ for k in bad]}.")
        what = {"names": "owner id -> display name", "works": "work id -> owner id",
                "merged": "shell owner id -> owner id"}
        for k, meaning in what.items():
            for key, value in d.get(k, {}).items():
                if not isinstance(value, str) or not value:
                    raise LedgerError(
                        f"owner registry entry {k}[{key!r}] must be a non-empty string ({k} maps "
                        f"{meaning}); got {value!r} of type {type(value).__name__}. Fix the registry "
                        "file, or write it again with OwnerRegistry.save(path)."
                    )
        reg = cls(names=d.get("names", {}))
        for work, owner in d.get("works", {}).items():
            reg.assign(work, owner)
        for shell, into in d.get("merged", {}).items():
            reg.merge(shell, into=into)
        return reg

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the registry as JSON; refuses to replace a file unless ``overwrite``.

        Written to a temporary beside ``path`` and moved into place: a failed write leaves the
        previous file as it was. Missing parent directories are created.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false, or is a directory.
            OutputPathError: ``path`` lies inside a datavalue run or under a regular file, or
                the OS refused the write (its reason is given).
            LedgerError: ``path`` is a royalty ledger or one of a ledger's own files.
            Nothing is written in any of these cases.
        """
        p = check_output_path(path, what="the owner registry", overwrite=overwrite)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_text_output(p, text, "the owner registry")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OwnerRegistry:
        """Read a registry written by :meth:`save`."""
        home = unexpanded_home_problem(path, "the owner registry", creating=False)
        if home is not None:  # Python does not expand "~" (issue 22)
            raise LedgerNotFoundError(home)
        p = Path(path)
        if not p.exists():
            raise LedgerNotFoundError(f"owner registry {p} does not exist.")
        if not p.is_file():
            raise LedgerError(f"owner registry {p} is a directory, not a JSON file; pass the registry's file.")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(
                f"owner registry {p} is not valid JSON ({exc}); restore it from backup, or write it again with "
                "OwnerRegistry.save(path)."
            ) from None
        if not isinstance(d, Mapping):
            raise LedgerError(
                f"owner registry {p} holds a JSON {type(d).__name__}, not an object with 'schema', 'names', "
                "'works' and 'merged' (what OwnerRegistry.save writes)."
            )
        try:
            return cls.from_dict(d)
        except (LedgerError, InvalidGameError, UnknownOwnerError) as exc:
            raise type(exc)(f"owner registry {p}: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"OwnerRegistry(owners={len(self.owners())}, works={len(self._works)}, "
            f"merged={len(self._merged)})"
        )
