"""Jinja filters for cookiecutter values: escaping for the file format a value lands in, and the
names derived from the project name.

Cookiecutter loads them through `_extensions` in cookiecutter.json. Python and TOML strings use
Jinja's own `tojson`; these cover the places a JSON string literal cannot go.
"""

import re
import unicodedata

from cookiecutter.utils import simple_filter


@simple_filter
def docstring(value: str) -> str:
    """Text that can stand inside a Python triple-quoted docstring, even when it ends in a quote."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


@simple_filter
def markdown(value: str) -> str:
    """Text that Markdown shows as typed: emphasis, code, link and HTML characters escaped."""
    escaped = re.sub(r"([\\`*_\[\]<>|])", r"\\\1", value)
    return re.sub(r"^(\s*)([-+#]|\d+\.)(\s)", r"\1\\\2\3", escaped)  # no list or heading at the start


@simple_filter
def slug(value: str) -> str:
    """A folder and distribution name from free text: "Alice's RL Lab" -> "alices-rl-lab".

    Accents become their letters (Zoë -> zoe); what is left that is not a lowercase letter, a digit
    or '-' is dropped, so every project name derives a slug the pre-generation hook accepts.
    """
    ascii_text = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode().lower()
    words = re.sub(r"[^a-z0-9-]", "", re.sub(r"[\s_]+", "-", ascii_text.strip()))
    return re.sub(r"-{2,}", "-", words).strip("-") or "rl-project"


@simple_filter
def identifier(value: str) -> str:
    """A Python package name from a slug: '-' becomes '_', and it starts with a letter ("2nd-lab" -> "nd_lab")."""
    name = re.sub(r"[^a-z0-9_]", "", value.lower().replace("-", "_")).lstrip("0123456789_")
    return name or "rl_project"
