"""Hypothesis strategies for ids the client accepts, from the rule itself (``_models``)."""

from __future__ import annotations

import unicodedata

from hypothesis import strategies as st

from agentbill._models import FORBIDDEN_CATEGORIES, INVISIBLE_CATEGORIES, MAX_ID_LENGTH


def valid_ids(max_size: int = MAX_ID_LENGTH) -> st.SearchStrategy[str]:
    """Any id ``_models.Id`` accepts: no forbidden character, at least one visible one."""
    return st.text(
        st.characters(exclude_categories=sorted(FORBIDDEN_CATEGORIES)),  # type: ignore[arg-type]
        min_size=1,
        max_size=max_size,
    ).filter(lambda s: any(unicodedata.category(ch) not in INVISIBLE_CATEGORIES for ch in s))
