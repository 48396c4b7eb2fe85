
import pyarrow as pa
import pytest

from shardsmith.filters.presets import PRESETS, preset_rules
from shardsmith.filters.rules import Rule, RuleError, RuleSet


def table(**cols):
    return pa.table(cols)


def test_parse_and_names():
    assert Rule.parse("aesthetic >= 5").name == "aesthetic>=5"
    assert Rule.parse("pwatermark<0.8").name == "pwatermark<0.8"
    assert Rule.parse("has url") == Rule("url", "has")
    for bad in ["aesthetic => 5", "aesthetic >= five", "", "5 >= aesthetic"]:
        with pytest.raises(RuleError):
            Rule.parse(bad)


def test_threshold_out_of_range_is_rejected():
    with pytest.raises(RuleError, match="outside the range of punsafe"):
        Rule.parse("punsafe < 1.5")
    with pytest.raises(RuleError, match="similarity"):
        Rule.parse("similarity >= -2")


def test_first_failing_rule_is_the_reason_and_nan_is_an_error():
    t = table(aesthetic=[6.0, 4.0, 6.0, float("nan"), 6.0], pwatermark=[0.1, 0.9, 0.9, 0.1, 1.7],
              punsafe=[0.1, 0.1, 0.1, 0.1, 0.1])
    d = RuleSet.parse(preset_rules("laion-aesthetics-5plus")).apply(t)
    assert list(d.status) == ["kept", "dropped", "dropped", "error", "error"]
    assert list(d.reason) == [None, "aesthetic>=5", "pwatermark<0.8", "missing_value", "bad_value"]
    assert "aesthetic is missing" in d.error[3]
    assert "pwatermark=1.7" in d.error[4]


def test_derived_fields_and_preexisting_errors_stay_errors():
    t = table(original_width=[600, 600, 2000, None], original_height=[600, 300, 600, None],
              caption=["a cat", "", "long caption here", "x"])
    rs = RuleSet.parse(["min_side >= 512", "aspect_ratio <= 3", "caption_length >= 2"])
    d = rs.apply(t, status=["kept", "kept", "kept", "error"], reason=[None, None, None, "decode_error"],
                 error=[None, None, None, "bad bytes"])
    assert list(d.status) == ["kept", "dropped", "dropped", "error"]
    assert list(d.reason) == [None, "min_side>=512", "aspect_ratio<=3", "decode_error"]
    assert d.error[3] == "bad bytes"


def test_sd_improved_preset_matches_model_card():
    rs = RuleSet.parse(preset_rules("sd-improved-aesthetics"))
    t = table(original_width=[512, 511, 1024], original_height=[512, 900, 1024], aesthetic=[5.01, 7.0, 5.0],
              pwatermark=[0.49, 0.1, 0.1])
    assert list(rs.apply(t).status) == ["kept", "dropped", "dropped"]
    assert set(PRESETS) >= {"laion-aesthetics-5plus", "sd-improved-aesthetics"}


def test_has_rule():
    t = table(url=["http://a", None, ""])
    assert list(RuleSet.parse(["has url"]).apply(t).status) == ["kept", "dropped", "dropped"]
