"""Group variables an inventory sets that the playbooks' group_vars/ set too.

Ansible ranks every group_vars/ file beside the playbooks above the `vars:` of any group in an
inventory file, so `all: {vars: {smolcluster_port: 7000}}` in inventory/cluster.yml loses to
group_vars/all.yml's 65432 without a word. The group_vars/ beside an inventory (kubespray's
inventory/<cluster>/group_vars/ layout) lose the same way, except that its files for a group
other than `all` outrank the playbooks' group_vars/all.yml (VARIABLE_PRECEDENCE's default
order). Preflight names each such variable instead. Reads YAML inventory files and group_vars
files on the controller; other sources are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

YAML = (".yml", ".yaml", ".json")


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads a `!vault` (or any tagged) value as nothing: only names count."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _load(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(errors="replace"), Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return None  # an encrypted file or not YAML: it names nothing we can read


def _names(data: Any) -> set[str]:
    return {str(k) for k in data} if isinstance(data, Mapping) else set()


def group_vars(base: Path) -> dict[str, dict[str, Path]]:
    """{group: {variable: the file that sets it}} from `<base>/group_vars/`."""
    root = base / "group_vars"
    found: dict[str, dict[str, Path]] = {}
    for entry in sorted(root.glob("*")):
        if entry.is_dir():
            group, files = entry.name, sorted(p for p in entry.rglob("*") if p.is_file())
        else:
            group, files = (entry.stem, [entry]) if entry.suffix in YAML else (entry.name, [entry])
        for path in files:
            for name in _names(_load(path)):
                found.setdefault(group, {}).setdefault(name, path)
    return found


class Setting(NamedTuple):
    """Variables one inventory file or group_vars file sets for a group."""

    where: str
    group: str
    names: set[str]
    above_playbook_all: bool  # an inventory's group_vars/<group>, group not `all`


def _groups_with_vars(name: str, body: Any) -> Iterator[tuple[str, set[str]]]:
    if not isinstance(body, Mapping):
        return
    if names := _names(body.get("vars")):
        yield name, names
    for child, child_body in (body.get("children") or {}).items():
        yield from _groups_with_vars(str(child), child_body)


def inventory_settings(sources: Iterable[str], playbook_dir: str) -> list[Setting]:
    """Each group's variables in the YAML inventory files among `sources` (a directory's files
    included) and in the group_vars/ beside them, unless that is the playbooks' own."""
    out: list[Setting] = []
    bases: list[Path] = []
    for source in sources:
        path = Path(source)
        files = sorted(p for p in path.iterdir() if p.suffix in YAML) if path.is_dir() else [path]
        for file in files:
            data = _load(file) if file.suffix in YAML else None
            for group, body in data.items() if isinstance(data, Mapping) else ():
                for name, names in _groups_with_vars(str(group), body):
                    out.append(Setting(str(file), name, names, False))
        base = (path if path.is_dir() else path.parent).resolve()
        if base not in bases and base != Path(playbook_dir).resolve():
            bases.append(base)
    for base in bases:
        for group, defined in group_vars(base).items():
            for where in sorted(set(defined.values())):
                names = {name for name, path in defined.items() if path == where}
                out.append(Setting(str(where), group, names, group != "all"))
    return out


def shadowed_errors(
    sources: Iterable[str], playbook_dir: str, groups: Mapping[str, Iterable[str]]
) -> list[str]:
    """One line per inventory group variable that the playbooks' group_vars/ override for some
    host."""
    members = {g: set(hosts) for g, hosts in groups.items()}
    errors = []
    winners = group_vars(Path(playbook_dir))
    for setting in inventory_settings(sources, playbook_dir):
        for other, defined in winners.items():
            if setting.above_playbook_all and other == "all":
                continue
            hosts = sorted(members.get(setting.group, set()) & members.get(other, set()))
            for name in sorted(setting.names & set(defined)) if hosts else ():
                file = defined[name].relative_to(playbook_dir)
                errors.append(
                    f"{setting.where} sets {name} for group {setting.group}, but {file} sets it "
                    f"for group {other} and wins on {', '.join(hosts)} (Ansible ranks the "
                    f"playbooks' group_vars/ above an inventory's group vars); set it per host, "
                    f"with -e, or in {file}"
                )
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"preflight_shadowed_errors": shadowed_errors}
