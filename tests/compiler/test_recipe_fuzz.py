"""Fuzzed recipes: thousands of malformed recipes each give a one-line error naming the field (or the YAML line), and write nothing."""

from __future__ import annotations

import contextlib
import io
import itertools
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from compiler import cli
from compiler.errors import RecipeError
from compiler.recipe import Recipe, load_recipe

BASE = {
    "name": "fuzz",
    "main": {"checkpoint": "main"},
    "draft": {"checkpoint": "draft"},
    "targets": ["cpu"],
    "export": {"max_sequence_length": 256},
    "calibrate": {"max_tokens": 1024, "window": 128},
    "partition": {"partitions": 2, "strategy": "balanced", "hot_share": 0.2},
    "quantize": {"weights": "int4", "method": "rtn", "block_size": 16, "hot_experts": "int8"},
    "verify": {"tokens": 512},
    "generation": {"draft_length": 4, "max_new_tokens": 64},
}


def _model_of(annotation) -> type[BaseModel] | None:
    """The recipe section a field holds (also through `X | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((m for m in map(_model_of, typing.get_args(annotation)) if m), None)
    return None


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> tuple[list[tuple[str, ...]], list[tuple[tuple[str, ...], type[BaseModel]]]]:
    """Every leaf field's path, and every section's path with its model."""
    leaves, sections = [], [(prefix, model)]
    for name, field in model.model_fields.items():
        section = _model_of(field.annotation)
        if section is None:
            leaves.append((*prefix, name))
        else:
            more_leaves, more_sections = _fields(section, (*prefix, name))
            leaves += more_leaves
            sections += more_sections
    return leaves, sections


LEAVES, SECTIONS = _fields(Recipe)
REQUIRED = [("name",), ("main",), ("draft",), ("main", "checkpoint"), ("draft", "checkpoint")]


def _annotation(path: tuple[str, ...]):
    model = Recipe
    for name in path[:-1]:
        model = _model_of(model.model_fields[name].annotation)
    return model.model_fields[path[-1]].annotation


def _is_container(annotation) -> bool:
    origins = {typing.get_origin(a) or a for a in (typing.get_args(annotation) or (annotation,))} | {typing.get_origin(annotation)}
    return bool(origins & {list, tuple, dict})


def _set(data: dict, path: tuple[str, ...], value) -> dict:
    node = data
    for name in path[:-1]:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[path[-1]] = value
    return data


def _delete(data: dict, path: tuple[str, ...]) -> dict:
    node = data
    for name in path[:-1]:
        node = node[name]
    node.pop(path[-1], None)
    return data


def _fresh() -> dict:
    return yaml.safe_load(yaml.safe_dump(BASE))


keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), keys)


@st.composite
def wrong_type(draw):
    """A container where the field takes a scalar, a mapping where it takes a list, a list where it takes a mapping."""
    path = draw(st.sampled_from(LEAVES))
    if _is_container(_annotation(path)):
        value = draw(st.dictionaries(keys, scalars, min_size=1, max_size=3))
    else:
        value = draw(st.one_of(st.lists(scalars, min_size=1, max_size=3), st.dictionaries(keys, scalars, min_size=1, max_size=3)))
    return _set(_fresh(), path, value), ".".join(path)


@st.composite
def unknown_key(draw):
    section, model = draw(st.sampled_from(SECTIONS))
    key = draw(keys.filter(lambda k: k not in model.model_fields))
    return _set(_fresh(), (*section, key), draw(scalars)), ".".join((*section, key))


@st.composite
def not_a_choice(draw):
    choices = [(path, typing.get_args(a)) for path in LEAVES for a in [_annotation(path)] if typing.get_origin(a) is typing.Literal]
    path, allowed = draw(st.sampled_from(choices))
    value = draw(keys.filter(lambda v: v not in allowed and v != "auto"))
    return _set(_fresh(), path, value), ".".join(path)


@st.composite
def missing_key(draw):
    path = draw(st.sampled_from(REQUIRED))
    return _delete(_fresh(), path), ".".join(path)


BREAKERS = ["{", "[", "]", ": : :", "\t- x", "key: 'open", "&a *b", "!!python/object/apply:os.system ['true']", "- - -", "? ? ?", "}", "@x", "`x"]


@st.composite
def broken_yaml(draw):
    lines = yaml.safe_dump(BASE, sort_keys=False).splitlines()
    at = draw(st.integers(0, len(lines)))
    lines.insert(at, draw(st.sampled_from(["", "  ", "    "])) + draw(st.sampled_from(BREAKERS)))
    return "\n".join(lines) + "\n", None


MALFORMED = st.one_of(wrong_type(), unknown_key(), not_a_choice(), missing_key(), broken_yaml())
counter = itertools.count()


@pytest.fixture(scope="module")
def folder(tiny_pair, tmp_path_factory):
    """Recipes are written beside the tiny pair's checkpoints, so only the fuzzed field can be wrong."""
    return tiny_pair, tmp_path_factory.mktemp("fuzz-output") / "artifacts"


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=MALFORMED)
def test_malformed_recipes_give_one_line_naming_the_field_and_write_nothing(folder, case):
    checkpoints, output = folder
    content, field = case
    recipe = checkpoints / f"fuzz-{next(counter)}.yaml"
    recipe.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    try:
        load_recipe(recipe)
        valid = True
    except RecipeError:
        valid = False
    assume(not valid)  # a mutation that still makes a valid recipe says nothing here
    errors, printed = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(printed):
        code = cli.main(["build", str(recipe), "--output", str(output)])
    message = errors.getvalue().strip()
    assert code == 1 and printed.getvalue() == ""
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in message, message
    assert f"{recipe.name}:" in message
    if field is None:
        assert "invalid YAML" in message or "a recipe is a mapping" in message or "field '" in message or "key '" in message, message
    else:
        named = field.split(".")
        assert any(".".join(named[:i]) in message for i in range(len(named), 0, -1)), message
    assert not output.exists()
    recipe.unlink()


def test_the_fuzzer_covers_every_kind_of_field():
    assert ("quantize", "block_size") in LEAVES and ("partition", "precision") in LEAVES and ("main", "quantize", "weights") in LEAVES
    assert len(LEAVES) > 40 and {section for section, _ in SECTIONS} >= {(), ("main",), ("quantize",), ("quantize", "classes")}
