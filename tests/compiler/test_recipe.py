"""Recipe parsing: valid recipes load into frozen objects; bad ones name the field and the line."""

from __future__ import annotations

import pytest

from compiler.errors import RecipeError
from compiler.recipe import load_recipe

GOOD = "name: tiny\nmain:\n  checkpoint: main\ndraft:\n  checkpoint: draft\n"


def _write(tmp_path, text):
    (tmp_path / "main").mkdir(exist_ok=True)
    (tmp_path / "draft").mkdir(exist_ok=True)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_loads_with_defaults_and_is_frozen(tmp_path):
    loaded = load_recipe(_write(tmp_path, GOOD))
    assert loaded.recipe.name == "tiny"
    assert loaded.recipe.export.max_sequence_length == 2048
    assert loaded.main_checkpoint == (tmp_path / "main").resolve()
    with pytest.raises(Exception):
        loaded.recipe.name = "other"


def test_unknown_key_names_field_and_line(tmp_path):
    path = _write(tmp_path, GOOD + "export:\n  precison: fp32\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:7: unknown key 'export\.precison'"):
        load_recipe(path)


def test_wrong_type_names_field_and_line(tmp_path):
    path = _write(tmp_path, GOOD + "generation:\n  draft_length: four\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:7: field 'generation\.draft_length'"):
        load_recipe(path)


def test_string_number_is_a_wrong_type(tmp_path):
    path = _write(tmp_path, GOOD + "generation:\n  draft_length: '4'\n")
    with pytest.raises(RecipeError, match=r"generation\.draft_length"):
        load_recipe(path)


def test_missing_key(tmp_path):
    path = _write(tmp_path, "name: tiny\nmain:\n  checkpoint: main\n")
    with pytest.raises(RecipeError, match=r"missing required key 'draft'"):
        load_recipe(path)


def test_missing_checkpoint_folder_names_field_and_line(tmp_path):
    path = _write(tmp_path, GOOD.replace("checkpoint: draft", "checkpoint: nowhere"))
    with pytest.raises(RecipeError, match=r"r\.yaml:5: field 'draft\.checkpoint': checkpoint folder not found"):
        load_recipe(path)


def test_python_tag_is_refused(tmp_path):
    path = _write(tmp_path, GOOD + "export: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:6: invalid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


def test_missing_calibration_text_names_field_and_line(tmp_path):
    path = _write(tmp_path, GOOD + "calibrate:\n  text: corpus/absent\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:7: field 'calibrate\.text': calibration text not found"):
        load_recipe(path)


def test_calibration_text_from_a_folder(tmp_path):
    from compiler.recipe import calibration_text

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.py").write_text("second")
    (tmp_path / "corpus" / "a.txt").write_text("first")
    (tmp_path / "corpus" / "skip.bin").write_bytes(b"\0")
    loaded = load_recipe(_write(tmp_path, GOOD + "calibrate:\n  text: corpus\n"))
    assert calibration_text(loaded) == "first\nsecond"


def test_quantize_rules_parse_and_inconsistent_ones_name_the_field(tmp_path):
    rules = "partition:\n  hot_share: 0.2\nquantize:\n  weights: int4\n  classes: {lm_head: int8}\n  hot_experts: int8\n"
    quantize = load_recipe(_write(tmp_path, GOOD + rules)).recipe.quantize
    assert quantize.classes.lm_head == "int8" and quantize.hot_experts == "int8"
    with pytest.raises(RecipeError, match=r"r\.yaml:8: unknown key 'quantize\.classes\.atention'"):
        load_recipe(_write(tmp_path, GOOD + "quantize:\n  weights: int4\n  classes: {atention: int8}\n"))
    with pytest.raises(RecipeError, match=r"r\.yaml:8: field 'quantize\.hot_experts': there is no hot tier to apply it to"):
        load_recipe(_write(tmp_path, GOOD + "quantize:\n  weights: int4\n  hot_experts: int8\n"))
    with pytest.raises(RecipeError, match=r"r\.yaml:6: field 'quantize': smoothquant needs activations: int8 and activation_range: minmax"):
        load_recipe(_write(tmp_path, GOOD + "quantize:\n  weights: int8\n  smoothquant: 0.5\n"))


def test_int8_kv_cache_names_what_it_needs(tmp_path):
    assert load_recipe(_write(tmp_path, GOOD + "quantize:\n  kv_cache: int8\n")).recipe.quantize.kv_cache == "int8"
    assert load_recipe(_write(tmp_path, GOOD)).recipe.quantize.kv_cache == "auto"
    with pytest.raises(RecipeError, match=r"r\.yaml:9: field 'quantize\.kv_cache': an int8 KV cache needs export\.precision: fp32"):
        load_recipe(_write(tmp_path, GOOD + "export:\n  precision: fp16\nquantize:\n  kv_cache: int8\n"))
    with pytest.raises(RecipeError, match=r"r\.yaml:7: field 'draft\.quantize\.kv_cache': an int8 KV cache is for the cpu target only") as refused:
        load_recipe(_write(tmp_path, GOOD.replace("draft:\n  checkpoint: draft\n", "") + "draft:\n  checkpoint: draft\n  quantize:\n    kv_cache: int8\ntargets: [cpu, tensorrt]\n"))
    assert "tensorrt.precision" in refused.value.hint


def test_draft_length_is_bounded_or_auto(tmp_path):
    assert load_recipe(_write(tmp_path, GOOD + "generation:\n  draft_length: auto\n")).recipe.generation.draft_length == "auto"
    with pytest.raises(RecipeError, match=r"r\.yaml:7: field 'generation\.draft_length': Input should be greater than or equal to 1 or Input should be 'auto'$"):
        load_recipe(_write(tmp_path, GOOD + "generation:\n  draft_length: 0\n"))
