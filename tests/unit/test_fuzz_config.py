"""Fuzzing the config loader (issue 8, "Bad input, everywhere"): whatever the YAML file and the
overrides hold, `load_config` returns a Config or raises ConfigError naming the key or the file,
quickly; never another exception, never a hang."""

from __future__ import annotations

import dataclasses
import math
import re
import string
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretrain.config import Config, load_config
from pretrain.config.parse import _YamlLoader, tagged_members, yaml_key
from pretrain.errors import ConfigError
from tests.conftest import time_limit

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
LOAD_SECONDS = 5  # one load takes milliseconds; this only turns a hang into a failure



def load(path: Path | None, overrides: list[str] = (), world_size: int = 1) -> Config | ConfigError:
    """load_config's Config, or the ConfigError it raised; any other exception fails the test."""
    with time_limit(LOAD_SECONDS, "load_config"):
        try:
            cfg = load_config(None if path is None else str(path), list(overrides), world_size=world_size)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
            return exc
    assert isinstance(cfg, Config)
    return cfg


class Dumper(yaml.SafeDumper):
    """Quotes what the loader would read as a float (`1e5`), so that a key comes back as written."""


Dumper.yaml_implicit_resolvers = _YamlLoader.yaml_implicit_resolvers


def write(path: Path, tree: Any) -> Path:
    path.write_text(yaml.dump(tree, Dumper=Dumper, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


# ---- the known keys, from the dataclasses themselves ----

def known_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type of every field of `cls`, sections (nested dataclasses) included."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + yaml_key(f), hints[f.name]
        if tagged_members(tp):  # the model families: the default one's keys (GPT-2's are a subset)
            tp = next(iter(tagged_members(tp).values()))
        keys[key] = tp
        if dataclasses.is_dataclass(tp):
            keys.update(known_keys(tp, key + "."))
    return keys


KNOWN = known_keys(Config)
SECTIONS = {key for key, tp in KNOWN.items() if dataclasses.is_dataclass(tp)}


def put(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b] = value for `a.b`, turning whatever stands on the way into a mapping."""
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[last] = value


# ---- values: any YAML value, and values of the right type (to get past the type checks) ----

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**12, max_value=10**40),
    st.floats(), st.text(max_size=20),
)
any_value = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()), children, max_size=4),
    max_leaves=8,
)


def typed(tp: Any, real_file: str) -> st.SearchStrategy:
    """Values of type `tp`, often plausible ones (small numbers, real file paths)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(None) in args:
        return st.none() | typed(next(a for a in args if a is not type(None)), real_file)
    if origin is Literal:
        return st.sampled_from(args)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-3, 5000) | st.integers()
    if tp is float:
        return st.floats(-1, 2) | st.floats()
    if tp is str:
        return st.sampled_from([real_file, "python-docs", "pretrain.hooks:perplexity"]) | st.text(max_size=30)
    if origin is list and dataclasses.is_dataclass(args[0]):  # data.sources
        entry = st.fixed_dictionaries(
            {"name": st.text(string.ascii_letters, min_size=1, max_size=6),
             "path": st.sampled_from([real_file, "python-docs", real_file + "*", "absent.jsonl"]) | st.text()},
            optional={"weight": st.floats(-1, 3), "text_field": st.text(max_size=5), "max_epochs": st.integers(-1, 3),
                      "bogus": any_value},
        )
        return st.lists(entry, max_size=3)
    if origin is list:
        return st.lists(typed(args[0], real_file), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), any_value, max_size=3)
    if dataclasses.is_dataclass(tp):
        return st.dictionaries(st.sampled_from([yaml_key(f) for f in dataclasses.fields(tp)]), any_value, max_size=3)
    raise AssertionError(f"no strategy for {tp}")


def value_for(key: str, real_file: str) -> st.SearchStrategy:
    return st.one_of(typed(KNOWN[key], real_file), any_value)


def unknown_keys() -> st.SearchStrategy:
    """Dotted keys that are not config keys: typos of known ones and random names, at the top
    level or inside a section."""
    typo = st.sampled_from(sorted(KNOWN)).flatmap(
        lambda key: st.sampled_from([key + "s", key[:-1], key.replace("_", "")]))
    name = st.text(st.characters(blacklist_characters="."), min_size=1, max_size=12)
    random = st.tuples(st.sampled_from(["", *sorted(SECTIONS)]), name).map(
        lambda t: f"{t[0]}.{t[1]}" if t[0] else t[1])
    return (typo | random).filter(lambda k: k not in KNOWN)


@st.composite
def config_trees(draw, real_file: str) -> tuple[dict, list[str]]:
    """(a config as nested mappings, the unknown keys in it): known keys with any values, and
    unknown keys, placed last so that their sections stay mappings."""
    tree: dict = {}
    chosen = draw(st.lists(st.sampled_from(sorted(KNOWN)), max_size=6, unique=True))
    for key in sorted(chosen, key=lambda k: k.count(".")):  # a section first, then keys inside it
        put(tree, key, draw(value_for(key, real_file)))
    unknown = draw(st.lists(unknown_keys(), max_size=2, unique=True))
    for key in unknown:
        put(tree, key, draw(any_value))
    return tree, unknown


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_config")


@pytest.fixture(scope="module")
def real_file(workdir) -> str:
    """A small data file, so that data.sources entries pointing at it get past the file checks."""
    path = workdir / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    return str(path)


# ---- properties ----

@FUZZ
@given(data=st.data(), world_size=st.integers(-1, 9))
def test_random_config_files_load_or_name_every_unknown_key(workdir, real_file, data, world_size):
    tree, unknown = data.draw(config_trees(real_file))
    path = write(workdir / "random.yaml", tree)
    result = load(path, world_size=world_size)
    if isinstance(result, Config):
        assert not unknown
        return
    message = str(result)
    assert str(path) in message
    for key in unknown:  # reported whatever else is wrong, with a did-you-mean where one is close
        assert f"unknown key {key!r}" in message


@FUZZ
@given(data=st.data())
def test_one_bad_value_is_reported_under_its_own_key(workdir, real_file, data):
    """Any value at any one known key: it loads, or the message names that key (the default
    config is valid, so the key is the only thing that can be wrong)."""
    key = data.draw(st.sampled_from(sorted(KNOWN)))
    value = data.draw(value_for(key, real_file))
    tree: dict = {}
    put(tree, key, value)
    result = load(write(workdir / "one.yaml", tree))
    if isinstance(value, float) and not math.isfinite(value) and float in typing.get_args(KNOWN[key]) + (KNOWN[key],):
        assert isinstance(result, ConfigError), f"{key}={value} loaded"  # no option means anything with NaN
    if isinstance(result, ConfigError):
        assert key in str(result) or _related(key, str(result)), (key, value, str(result))


# Messages that describe a key's value without naming the key (config_checks._check_batch says "the
# global batch of N sequences"): left as they are there, but any new one fails the test above.
_PARTNERS = {"train.global_batch_sequences": "the global batch of"}


def _related(key: str, message: str) -> bool:
    return key in _PARTNERS and _PARTNERS[key] in message


override_keys = st.one_of(st.sampled_from(sorted(KNOWN)), unknown_keys())
override_values = st.one_of(
    any_value.map(lambda v: yaml.dump(v, Dumper=Dumper, default_flow_style=True, width=10**6).strip()
                  .removesuffix("...")),
    st.text(max_size=30),
)
malformed = st.one_of(
    st.text(max_size=20),
    override_keys.map(lambda k: f"--{k}"),  # no '='
    override_keys.map(lambda k: f"-{k}=1"),
    override_values.map(lambda v: f"--={v}"),
    st.text(max_size=10).map(lambda k: f"--{k}=1"),
)


@st.composite
def override_lists(draw) -> tuple[list[str], list[str]]:
    """(arguments, those that are not --key=value at all)."""
    args, bad = [], []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)):
            args.append(f"--{draw(override_keys)}={draw(override_values)}")
        else:
            args.append(draw(malformed))
            if not re.fullmatch(r"--([A-Za-z_][\w.]*)=(.*)", args[-1], flags=re.DOTALL):
                bad.append(args[-1])
    return args, bad


@FUZZ
@given(data=st.data(), with_file=st.booleans())
def test_random_overrides_load_or_name_the_argument(workdir, real_file, data, with_file):
    args, malformed_args = data.draw(override_lists())
    path = write(workdir / "base.yaml", data.draw(config_trees(real_file))[0]) if with_file else None
    result = load(path, args)
    if isinstance(result, Config):
        return
    message = str(result)
    for arg in malformed_args:
        assert f"cannot read the argument {arg!r}" in message


yaml_fragments = st.sampled_from([
    "train:\n", "  max_steps: 5\n", "model: {d_model: 64\n", "- a\n", ": x\n", "? [a]\n", "&a x\n", "*a\n",
    "  - [\n", '"unclosed\n', "'\n", "\t\n", "key: value: other\n", "!!binary x\n", "!!python/object:os.system\n",
    "%YAML 1.2\n---\n", "---\n...\n", "data:\n  sources: [{name: a}]\n", "{[1, 2]: 3}\n", "<<: *a\n", "#\n",
])


@FUZZ
@given(text=st.one_of(
    st.lists(yaml_fragments, max_size=6).map("".join),
    st.lists(st.one_of(yaml_fragments, st.text(max_size=10)), max_size=6).map("".join),
    st.text(),
))
def test_yaml_syntax_errors_and_non_mapping_documents_name_the_file(workdir, text):
    path = workdir / "syntax.yaml"
    path.write_text(text, encoding="utf-8")
    result = load(path)
    if isinstance(result, ConfigError):
        assert str(path) in str(result)


@pytest.mark.parametrize("document", ["[1, 2]", "5", "hello", "[{train: 1}]", "!!binary aGVsbG8=", "1.5e3"])
def test_a_document_that_is_not_a_mapping_is_an_error(workdir, document):
    path = workdir / "scalar.yaml"
    path.write_text(document + "\n")
    error = load(path)
    assert isinstance(error, ConfigError)
    assert str(path) in str(error) and "the config must be a mapping of keys to values" in str(error)


def test_a_directory_or_a_missing_file_names_the_path(workdir):
    for path, reason in ((workdir, "Is a directory"), (workdir / "absent.yaml", "No such file")):
        error = load(path)
        assert isinstance(error, ConfigError)
        assert f"cannot read config file {str(path)!r}" in str(error) and reason in str(error)


# ---- inputs that crashed or hung the loader, and the messages they get now ----

BOMB = "".join(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}' if i else 'x'] * 10)}]\n"
               for i in range(9))  # 10**9 elements once expanded ("billion laughs")

REGRESSIONS = [
    # (YAML file, overrides, world size, expected message)
    (None, ["--out_dir=a\x00b"], 1,
     "--out_dir: the value 'a\\x00b' holds the character #x0000, which YAML does not allow"),
    (None, ["--out_dir=\udcff"], 1, "holds the character #xdcff"),
    ("train:\n  seed: " + "1" * 5000, [], 1, "a value read as a number or a date cannot be converted"),
    ("out_dir: 2024-13-45\n", [], 1, "cannot be converted (month must be in 1..12); quote it if it is meant as text"),
    (None, ["--out_dir=2024-13-45"], 1, "--out_dir: the value '2024-13-45' is not valid YAML"),
    ("out_dir: " + "[" * 5000, [], 1, "collections nested too deeply"),
    (None, ["--eval.hooks=" + "[" * 5000 + "]" * 5000], 1, "collections nested too deeply"),
    ("optim:\n  lr: 1" + "0" * 400, [], 1, "optim.lr=1000000000000"),
    (None, ["--optim.lr=.nan"], 1, "optim.lr=nan must be a finite number"),
    (None, ["--train.hang_timeout_s=-.inf"], 1, "train.hang_timeout_s=-inf must be a finite number"),
    (None, ["--model.d_model=1000000000001"], 1, "choose n_heads in {the divisors of 1000000000001}"),
    (None, [f"--model.d_model={2**39}", "--model.n_heads=3", "--model.n_kv_heads=1"], 1,
     "choose n_heads in {" + ", ".join(str(2**i) for i in range(40)) + "}"),
    (None, ["--model.n_heads=" + "9" * 30, "--model.d_model=" + "9" * 30], 1, "not divisible by model.n_kv_heads=8"),
    (None, [], 0, "the world size is 0; it must be >= 1"),
    (None, [], -3, "the world size is -3"),
    (None, ["--parallel.zero_stage=true"], 1, "parallel.zero_stage=True is not one of 1, 2, 3"),
    (None, ["--eval.hooks=[a:b]", "--eval.hook_options={1: {}, a:b: {}}"], 1,
     "eval.hook_options: the key 1 is a int, not a string; quote it: '1'"),
    ('data:\n  sources: [{name: a, path: "a\\0/*.txt"}]\n', [], 1,
     "data.sources[0].path='a\\x00/*.txt' cannot name a file: it holds a NUL character"),
    ('data:\n  sources: [{name: a, path: "~\\0/x.txt"}]\n', [], 1, "cannot name a file"),
    (BOMB + "out_dir: *i\ntrain:\n  precision: *i\n", [], 1, "out_dir=[[[[...], [...], [...], [...], [...], [...]"),
    ("out_dir: &a [*a]\n", [], 1, "out_dir=[[[[...]]]] has the wrong type"),
]


@pytest.mark.parametrize("text, overrides, world_size, expected", REGRESSIONS)
def test_inputs_that_crashed_or_hung_now_get_a_message(workdir, text, overrides, world_size, expected):
    path = None
    if text is not None:
        path = workdir / "regression.yaml"
        path.write_text(text)
    error = load(path, overrides, world_size)
    assert isinstance(error, ConfigError), error
    assert expected in str(error)


def test_a_file_that_is_not_utf8_names_the_file(workdir):
    path = workdir / "latin1.yaml"
    path.write_bytes(b"out_dir: caf\xe9\n")
    error = load(path)
    assert isinstance(error, ConfigError) and str(path) in str(error)


@pytest.mark.parametrize("document", ["[]", "0", "false", "''"])
def test_a_falsy_document_that_is_not_a_mapping_is_an_error(workdir, document):
    path = workdir / "falsy.yaml"
    path.write_text(document + "\n")
    assert isinstance(load(path), ConfigError)


def test_a_path_with_a_nul_and_a_garbled_world_size_are_config_errors(workdir, monkeypatch):
    assert "cannot read config file" in str(load("a\0b"))
    path = workdir / "empty.yaml"
    path.write_text("")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    error = load(path, [], None)
    assert isinstance(error, ConfigError) and "WORLD_SIZE='abc'" in str(error)
