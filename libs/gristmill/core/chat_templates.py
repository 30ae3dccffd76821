"""Chat templates as transformers finds them in a model directory, and the hash that ties training to serving:
training records the SHA-256 of the template it rendered with in the version's lineage
(``chat_template.sha256``), the registry records its base models' one, and serving refuses a version whose
tokenizer carries another template than its lineage says."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

from gristmill.core.errors import InvalidArgumentError

# Where transformers reads the chat template from, in its order of precedence.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The lineage hyper-parameter holding the template's hash.
LINEAGE_KEY = "chat_template.sha256"


def chat_template_sha256(template: str) -> str:
    """The SHA-256 of a chat template's UTF-8 text."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def read_chat_template(root: Path, names: Collection[str] | None = None) -> str:
    """The chat template the tokenizer in ``root`` applies by default, as transformers finds it; "" when none.

    ``names``: the files of the directory (default: listed). ``chat_template.jinja`` wins over
    ``tokenizer_config.json``'s ``chat_template``, which is a string or a list of ``{"name", "template"}`` (then
    the one named ``default``, the one ``apply_chat_template`` uses without tools). The text is taken as written,
    so its SHA-256 equals that of the loaded ``tokenizer.chat_template``.
    """
    present = set(names) if names is not None else {p.name for p in root.iterdir() if p.is_file()}
    if CHAT_TEMPLATE_FILE in present:
        try:
            return (root / CHAT_TEMPLATE_FILE).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"{CHAT_TEMPLATE_FILE} is not UTF-8 text") from None
    if TOKENIZER_CONFIG_FILE not in present:
        return ""
    try:
        config = json.loads((root / TOKENIZER_CONFIG_FILE).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"{TOKENIZER_CONFIG_FILE} is not valid JSON: {exc}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if template is None:
        return ""
    if not isinstance(template, str):
        raise InvalidArgumentError(
            f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of {{name, template}} objects"
        )
    return template
