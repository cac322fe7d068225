"""Hypothesis strategies shared by several test modules."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def json_values(max_key_size: int | None = None, max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Any JSON value: scalars (finite floats), lists and objects, nested."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda children: (
            st.lists(children, max_size=5)
            | st.dictionaries(st.text(max_size=max_key_size), children, max_size=5)
        ),
        max_leaves=max_leaves,
    )
