"""One config contract: the pydantic models (smolcluster/config.py) define every key; the CLI
flags, the README tables, the trainer role and train.yml's -e checks must agree with them.

Adding a key to a model fails here until its README line exists; a role variable or -e name
that maps to a key must have the key's type, choices and (where it has one) default.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from smolcluster.cli import FLAG_ALIASES, build_parser
from smolcluster.config import OVERRIDES, ModelConfig, config_fields, value_type
from tests.ansible_helpers import REPO, load_plugin

ROLE = REPO / "roles" / "trainer"
SPEC = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
OPTIONS: dict[str, dict[str, Any]] = SPEC["argument_specs"]["main"]["options"]
ROLE_DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
CHECKS = load_plugin(REPO / "ansible" / "plugins" / "filter" / "smolcluster_checks.py")

# Role variables named otherwise than trainer_<override or key>; `backend` as -e also picks
# the job launcher, so it may allow more than the key does.
ROLE_ALIASES = {
    "trainer_comm_backend": ("cluster", "backend"),
    "smolcluster_port": ("cluster", "port"),
    "smolcluster_bind_address": ("cluster", "bind_address"),
}
LAUNCHERS = ("tmux", "launchd", "systemd")
# Role values that mean something the key cannot say: 0 = "no cap" / "sized to the run".
SENTINELS = {"trainer_max_steps": 0, "trainer_eval_steps": 0, "max_steps": 0}
# Role values the key cannot hold: `auto`, settled from every host's answer
# (roles/trainer/filter_plugins/trainer_shared.py), else the key's own values.
SETTLED = {"trainer_fused_adam": "auto"}
# Role defaults that differ from the trainer's on purpose.
OWN_DEFAULTS = {"trainer_track_gradients": "train.yml runs log gradient norms; by hand: opt-in"}
SPEC_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def key_of(variable: str) -> tuple[str, str] | None:
    """The config key a role variable or -e name sets, if any."""
    if variable in ROLE_ALIASES:
        return ROLE_ALIASES[variable]
    name = variable.removeprefix("trainer_")
    if name in OVERRIDES:
        return OVERRIDES[name]
    for which in ("cluster", "nn"):
        if name in config_fields(which):
            return which, name
    return None


def mapped_options() -> list[str]:
    return [name for name in OPTIONS if key_of(name) is not None]


def field(which: str, key: str) -> FieldInfo:
    return config_fields(which)[key]


# --- the CLI ---------------------------------------------------------------------------------


def test_every_override_names_a_key() -> None:
    for name, (which, key) in OVERRIDES.items():
        assert key in config_fields(which), name


SAMPLES = {int: ("3", 3), float: ("2.5", 2.5), str: ("some/where", "some/where")}


@pytest.mark.parametrize("name", OVERRIDES)
def test_each_override_flag_takes_the_keys_type_and_choices(name: str) -> None:
    kind, flag = value_type(field(*OVERRIDES[name])), f"--{name.replace('_', '-')}"
    parse = build_parser().parse_args
    if kind is bool:
        assert getattr(parse(["check-config", flag]), name) is True
        assert getattr(parse(["check-config", f"--no-{flag[2:]}"]), name) is False
    elif get_origin(kind) is Literal:
        for choice in get_args(kind):
            assert getattr(parse(["check-config", flag, choice]), name) == choice
        with pytest.raises(SystemExit):
            parse(["check-config", flag, "bogus"])
    else:
        typed, value = SAMPLES[kind]
        assert getattr(parse(["check-config", flag, typed]), name) == value
    assert getattr(parse(["check-config"]), name) is None  # unset: the file decides


# --- the README ------------------------------------------------------------------------------


def readme_table(heading: str) -> dict[str, str]:
    """`key -> default` from the README table under **<heading>**; "a, b | 1, 2" is two rows."""
    text = (REPO / "README.md").read_text()
    block = text.split(f"**{heading}**", 1)[1].split("\n\n", 2)[1]
    rows: dict[str, str] = {}
    for line in block.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        keys = re.findall(r"`([^`]+)`", cells[0])
        defaults = cells[1].split(", ") if len(keys) > 1 else [cells[1]]
        assert len(defaults) == len(keys), line
        for key, default in zip(keys, defaults, strict=True):
            assert key not in rows, f"README documents {key} twice"
            rows[key] = default
    return rows


def doc_value(text: str) -> Any:
    """A README default cell as a value: required, a dash (none), booleans, {}, N MiB, numbers."""
    words: dict[str, Any] = {"required": PydanticUndefined, "\u2013": None, "{}": {},
                             "true": True, "false": False}  # fmt: skip
    if text in words:
        return words[text]
    if text.endswith(" MiB"):
        return int(text.removesuffix(" MiB")) * 1024 * 1024
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


@pytest.mark.parametrize(("which", "heading"), [("cluster", "Cluster config"), ("nn", "NN config")])
def test_readme_documents_every_key_with_its_default(which: str, heading: str) -> None:
    documented, fields = readme_table(heading), config_fields(which)
    assert sorted(set(fields) - set(documented)) == [], "keys without a README line"
    assert sorted(set(documented) - set(fields)) == [], "README keys the model does not have"
    for key, text in documented.items():
        default = fields[key].get_default(call_default_factory=True)
        assert doc_value(text) == default, f"README says {key} defaults to {text}, not {default!r}"


def spellings(name: str) -> list[str]:
    return [f"--{name.replace('_', '-')}", *FLAG_ALIASES.get(name, [])]


def test_readme_lists_every_override_flag() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [
        name for name in OVERRIDES if not any(f"`{flag}`" in readme for flag in spellings(name))
    ]
    assert missing == [], "flags missing from the README's list"


# --- the trainer role and train.yml ----------------------------------------------------------


def test_role_options_have_the_keys_types_and_choices() -> None:
    assert len(mapped_options()) > 20  # the mapping is not vacuous
    for name in mapped_options():
        option, kind = OPTIONS[name], value_type(field(*key_of(name)))
        if name in SETTLED:  # `auto` or one of the key's values
            assert option["type"] == "raw", name
        elif get_origin(kind) is Literal:
            assert option["type"] == "str", name
            allowed = set(option["choices"]) - (set(LAUNCHERS) if name == "backend" else set())
            assert allowed == set(get_args(kind)), name
        elif get_origin(kind) in (dict, list):  # -e workers is "a,b" or a list: raw
            assert option["type"] in (get_origin(kind).__name__, "raw"), name
        else:
            assert option["type"] == SPEC_TYPES[kind], name


def test_role_defaults_are_the_keys_defaults() -> None:
    compared = 0
    for name in mapped_options():
        default = field(*key_of(name)).get_default(call_default_factory=True)
        if name not in ROLE_DEFAULTS or default is PydanticUndefined or name in OWN_DEFAULTS:
            continue
        value = ROLE_DEFAULTS[name]
        assert value in (SENTINELS.get(name, default), SETTLED.get(name), default), name
        compared += 1
    assert compared >= 8


def test_the_model_section_default_is_the_models() -> None:
    assert ROLE_DEFAULTS["trainer_model"] == ModelConfig().model_dump()


def test_the_rendered_configs_name_only_keys_of_the_models() -> None:
    facts = yaml.safe_load((ROLE / "tasks" / "facts.yml").read_text())
    built = next(
        task
        for task in facts
        if "trainer__cluster_config" in task.get("ansible.builtin.set_fact", {})
    )
    for which in ("cluster", "nn"):
        keys = set(built["ansible.builtin.set_fact"][f"trainer__{which}_config"])
        top = {key.split(".")[0] for key in config_fields(which)}
        assert sorted(keys - top) == [], f"the role writes keys the {which} model does not have"
    # The NN sections are written whole: their keys are the models'.
    nn = built["ansible.builtin.set_fact"]["trainer__nn_config"]
    assert set(nn["dataset"]) == {
        key.split(".")[1] for key in config_fields("nn") if key.startswith("dataset.")
    }


def overrides_checked_by_train_yml() -> list[str]:
    play = yaml.safe_load((REPO / "train.yml").read_text())[0]
    return play["tasks"][0]["vars"]["train__names"]


def test_train_yml_checks_the_overrides_the_role_knows() -> None:
    names = overrides_checked_by_train_yml()
    assert set(names) == set(CHECKS.override_names())
    for name in names:
        assert name in OPTIONS, f"-e {name} is not in the trainer's argument spec"
        assert name == "workers" or name in OVERRIDES, f"-e {name} is not a config override"


def test_the_role_uses_every_checked_override() -> None:
    facts = (ROLE / "tasks" / "facts.yml").read_text()
    knob_task = next(t for t in yaml.safe_load(facts) if "trainer__knob_types" in t.get("vars", {}))
    knobs = knob_task["vars"]["trainer__knob_types"]
    for name, kind in knobs.items():
        assert kind == SPEC_TYPES[value_type(field(*OVERRIDES[name]))], name
    for name in overrides_checked_by_train_yml():
        used = name in knobs or re.search(rf"\b{name} \| default\(", facts)
        assert used, f"-e {name} is checked but never reaches a config"


def probes(kind: Any) -> list[Any]:
    if kind is bool:
        return [True, False]
    if get_origin(kind) is Literal:
        return [*get_args(kind), "bogus"]
    if kind is int:
        return [-1, 0, 1, 2, 1000]
    return [-1.0, 0.0, 0.001, 1.0, 1e9]


@pytest.mark.parametrize("name", [name for name in CHECKS.RULES if name in OVERRIDES])
def test_each_override_rule_accepts_what_the_model_accepts(name: str) -> None:
    info = field(*OVERRIDES[name])
    constrained = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    model = TypeAdapter(constrained)
    for value in probes(value_type(info)):
        try:
            model.validate_python(None if name in SENTINELS and value == SENTINELS[name] else value)
            model_ok = True
        except ValidationError:
            model_ok = False
        given = str(value).lower() if isinstance(value, bool) else str(value)  # -e is a string
        problem = CHECKS.RULES[name](given)
        assert (problem is None) == model_ok, (name, value, problem)
