"""Which model ids the gateway serves (`api/catalog.py`): its models, their aliases, dated ids."""

import pytest

from api.catalog import resolve_model, served_models
from api.errors import OpenAIError
from shared.settings import Settings


def test_an_alias_of_a_model_not_served_is_not_served() -> None:
    """Found by an outside probe: an alias of a model outside MODELS was listed and ran jobs with
    that model although MODEL_PASS_THROUGH was off (a typo in its target found only upstream)."""
    settings = Settings(
        models=["claude-sonnet-4-5"],
        model_aliases={"typo": "claude-sonet-4-5", "pinned": "claude-sonnet-4-5-20250929"},
    )
    with pytest.raises(OpenAIError) as refused:
        resolve_model("typo", settings)
    assert refused.value.info.code == "model_not_found"
    # A re-check probe: an alias pinned to a dated id of a served model is served, as that id is.
    assert resolve_model("pinned", settings) == "claude-sonnet-4-5-20250929"
    assert [model.id for model in served_models(settings)] == ["claude-sonnet-4-5", "pinned"]
    passing = Settings(
        models=["claude-sonnet-4-5"], model_aliases={"x": "other-model"}, model_pass_through=True
    )
    assert resolve_model("x", passing) == "other-model"
