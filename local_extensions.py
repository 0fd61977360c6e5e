"""Jinja filters that escape a cookiecutter value for the file format it lands in.

Cookiecutter loads them through `_extensions` in cookiecutter.json. Python and TOML strings use
Jinja's own `tojson`; these cover the places a JSON string literal cannot go.
"""

import re

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
