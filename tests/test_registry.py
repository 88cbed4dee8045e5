import pytest

from hat.errors import RegistryError
from hat.registry import build, get, list_registered, register


@register(kind="test_kind")
class Pair:
    def __init__(self, left: int, right: float = 1.0, inner=None):
        self.left, self.right, self.inner = left, right, inner


def test_build_nested_type_mappings():
    obj = build({"type": "Pair", "left": 1, "inner": {"type": "Pair", "left": 2, "right": 3}})
    assert (obj.left, obj.right) == (1, 1.0)
    assert isinstance(obj.inner, Pair) and obj.inner.right == 3


def test_name_defaults_to_class_name_and_lists_by_kind():
    assert list_registered("test_kind") == ["Pair"]
    assert "resnet18" in list_registered("model")


def test_unknown_name_shows_key_path_close_match_and_how_to_list():
    with pytest.raises(RegistryError) as err:
        build({"type": "resnet81"}, "model", kind="model")
    message = str(err.value)
    assert "model.type" in message and "'resnet18'" in message and "--list" in message


def test_kind_restricts_lookup():
    with pytest.raises(RegistryError, match="optimizer.type: 'resnet18' is of kind model, but this key takes "
                                            "kind optimizer"):
        get("resnet18", kind="optimizer", where="optimizer.type")
    with pytest.raises(RegistryError, match="unknown optimizer name 'resnet81'"):
        get("resnet81", kind="optimizer", where="optimizer.type")


def test_nested_builds_are_restricted_to_model_parts_and_the_parents_kind():
    """`+model.extra={type: float}` used to call the float *stage* while building the model."""
    calls = []
    register(lambda: calls.append(1), name="side_effect_stage", kind="stage")
    with pytest.raises(RegistryError, match=r"model\.inner\.type: 'side_effect_stage' is of kind stage"):
        build({"type": "Pair", "left": 1, "inner": {"type": "side_effect_stage"}}, "model")
    with pytest.raises(RegistryError, match=r"model\.left: takes int, not a built object"):
        build({"type": "Pair", "left": {"type": "Pair", "left": 1}}, "model")
    assert calls == []


def test_unknown_argument_names_config_key_and_suggests():
    with pytest.raises(RegistryError, match=r"model\.lfet: not an argument of Pair\. Did you mean 'left'\?"):
        build({"type": "Pair", "lfet": 1}, "model")


def test_missing_required_argument():
    with pytest.raises(RegistryError, match="Pair needs left"):
        build({"type": "Pair"}, "model")


def test_wrong_value_type_names_key():
    with pytest.raises(RegistryError, match=r"model\.left: expected int, got str 'abc'"):
        build({"type": "Pair", "left": "abc"}, "model")


def test_int_accepted_for_float_but_not_bool_for_int():
    assert build({"type": "Pair", "left": 1, "right": 2}).right == 2
    with pytest.raises(RegistryError, match="expected int"):
        build({"type": "Pair", "left": True})


def test_config_cannot_import_arbitrary_code():
    with pytest.raises(RegistryError, match="unknown name 'os.system'"):
        build({"type": "os.system", "command": "true"})


def test_registering_a_second_object_under_a_taken_name_fails():
    with pytest.raises(RegistryError, match="registered twice"):
        register(lambda: None, name="Pair")
