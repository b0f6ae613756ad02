"""The documentation site stays in step with the code.

`make test` builds the site with ``mkdocs build --strict`` (broken API references, unresolved cross-references and
pages missing from the nav fail there). These tests check what mkdocs cannot:

- every error message the package raises is documented in ``docs/troubleshooting.md``;
- every option of ``optimum-cli olica`` appears in ``docs/cli.md``;
- every page under ``docs/`` is in the nav of ``mkdocs.yml``, and every relative link of the pages and of the README
  resolves (the README is read on GitHub and PyPI, outside mkdocs).
"""

from __future__ import annotations

import argparse
import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# Where raise statements are collected: the package and the optimum-cli registration file(s).
SOURCE_ROOTS = [REPO / "optimum_olica", REPO / "optimum" / "commands" / "register"]
# A message's documented fragment: its first literal run of at least this many characters, cut to FRAGMENT_CHARS.
MIN_FRAGMENT_CHARS = 10
FRAGMENT_CHARS = 25


def normalise(text: str) -> str:
    """Lower case, no backticks or quotes, one space between words: how a message and its documentation compare."""
    text = re.sub(r"[`'\"]", "", text.lower())
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class RaisedMessage:
    location: str  # path:line
    error: str  # exception class name
    fragment: str  # normalised literal text that the troubleshooting page must contain


def _literal_runs(node: ast.expr) -> list[str] | None:
    """The literal pieces of a message expression, in order; None when it has no literal start.

    Handles plain strings, f-strings (formatted values split the runs), ``"..." + x`` concatenations and
    ``"...".format(...)`` calls. A message held in a variable, or built by a call, has no literal to check.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        runs, current = [], ""
        for part in node.values:
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                current += part.value
            else:
                runs.append(current)
                current = ""
        runs.append(current)
        return runs
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _literal_runs(node.left)
        if left is None:
            return None
        right = _literal_runs(node.right)
        return left + (right if right is not None else [""])
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
    ):
        return re.split(r"\{[^{}]*\}", node.func.value.value)
    return None


def _fragment(runs: list[str]) -> str | None:
    """The first literal run that reads as words (3 or more, 10+ characters), else the longest long-enough run."""
    candidates = [normalise(run) for run in runs]
    for candidate in candidates:
        if len(candidate) >= MIN_FRAGMENT_CHARS and len(re.findall(r"[a-z0-9_]+", candidate)) >= 3:
            return candidate[:FRAGMENT_CHARS].strip()
    longest = max(candidates, key=len, default="")
    return longest[:FRAGMENT_CHARS].strip() if len(longest) >= MIN_FRAGMENT_CHARS else None


def _exception_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return "?"


def source_files() -> list[Path]:
    return sorted(path for root in SOURCE_ROOTS if root.is_dir() for path in root.rglob("*.py"))


def raised_messages() -> list[RaisedMessage]:
    """Every ``raise SomeError(<literal message>)`` in the package; re-raises and variable messages are skipped."""
    messages = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call) or not node.exc.args:
                continue
            runs = _literal_runs(node.exc.args[0])
            fragment = None if runs is None else _fragment(runs)
            if fragment is None:
                continue
            location = f"{path.relative_to(REPO)}:{node.lineno}"
            messages.append(RaisedMessage(location, _exception_name(node.exc), fragment))
    return messages


def test_collector_reads_known_messages():
    """The collector itself finds messages of each shape (plain, f-string, f-string with a placeholder first)."""
    fragments = {message.fragment for message in raised_messages()}
    # OlicaConfig.from_pretrained: f"No {CONFIG_NAME} in directory {path!r}: was it saved ..." -> the first run of
    # three words or more.
    assert ": was it saved with olica" in fragments
    # olica_config_class_for: f"Olica does not support model_type=..."
    assert "olica does not support mo" in fragments
    # OlicaConfig._check_int: f"`{name}` must be an integer >= {minimum}, got ..." -> the run after the placeholder.
    assert "must be an integer >=" in fragments
    assert len(fragments) > 40


def test_every_error_message_is_in_troubleshooting():
    page = normalise((DOCS / "troubleshooting.md").read_text(encoding="utf-8"))
    missing = [
        f"{message.location} {message.error}: {message.fragment!r}"
        for message in raised_messages()
        if message.fragment not in page
    ]
    assert not missing, (
        "These error messages are not documented in docs/troubleshooting.md (add the message, its cause and its "
        "fix):\n  " + "\n  ".join(missing)
    )


# ---------------------------------------------------------------------------------------------------------------
# CLI reference
# ---------------------------------------------------------------------------------------------------------------


def _option_strings(parser: argparse.ArgumentParser, seen: set[int] | None = None) -> set[str]:
    """Every option string of a parser and of its subparsers (``--ratio``, ``-v``, ...)."""
    seen = set() if seen is None else seen
    if id(parser) in seen:
        return set()
    seen.add(id(parser))
    options = set()
    for action in parser._actions:
        options.update(option for option in action.option_strings if option not in ("-h", "--help"))
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options |= _option_strings(subparser, seen)
    return options


def olica_cli_parser() -> argparse.ArgumentParser:
    """The parser of `optimum-cli olica`, built by optimum's own root command from the real command classes.

    (register_olica.py registers a light stand-in unless the command line asks for `olica`, so the test builds the
    tree from `optimum_olica.commands.OlicaCommand`, as `optimum-cli olica ...` does.)
    """
    commands = pytest.importorskip(
        "optimum_olica.commands", reason="the optimum-cli olica commands (optimum_olica/commands/) do not exist yet"
    )
    from optimum.commands.base import CommandInfo, RootOptimumCLICommand

    root = RootOptimumCLICommand("optimum-cli", usage="optimum-cli")
    command = commands.OlicaCommand
    root.register_subcommand(CommandInfo(command.COMMAND.name, command.COMMAND.help, command))
    return root.parser


def test_cli_reference_lists_every_option():
    parser = olica_cli_parser()
    options = _option_strings(parser)
    assert "--ratio" in options, f"the olica parser has no --ratio option: {sorted(options)}"
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = sorted(option for option in options if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page))
    assert not missing, f"docs/cli.md does not document these options of `optimum-cli olica`: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# Nav and links
# ---------------------------------------------------------------------------------------------------------------


def _nav_pages() -> set[str]:
    """The .md paths listed in mkdocs.yml's nav (yaml.safe_load: the file uses no custom YAML tags)."""
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    pages: set[str] = set()

    def walk(item) -> None:
        if isinstance(item, str):
            pages.add(item)
        elif isinstance(item, list):
            for child in item:
                walk(child)
        elif isinstance(item, dict):
            for child in item.values():
                walk(child)

    walk(config["nav"])
    return pages


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_every_page_is_in_the_nav():
    nav = _nav_pages()
    pages = {path.relative_to(DOCS).as_posix() for path in doc_pages()}
    assert pages - nav == set(), f"pages missing from mkdocs.yml nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _heading_anchors(markdown: str) -> set[str]:
    """The ids mkdocs' toc extension gives the headings of a page (lower case, punctuation dropped, dashes)."""
    anchors = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*$", _FENCE.sub("", markdown), re.MULTILINE):
        title = re.sub(r"[`*]", "", match.group(1)).lower()
        title = re.sub(r"[^\w\s-]", "", title)
        anchors.add(re.sub(r"[\s-]+", "-", title).strip("-"))
    return anchors


def _relative_links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # links inside code spans are not links
    links = [first or second for first, second in _LINK.findall(text)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link) and not link.startswith("/")]


@pytest.mark.parametrize("path", [*doc_pages(), REPO / "README.md"], ids=lambda path: path.relative_to(REPO).as_posix())
def test_relative_links_resolve(path: Path):
    broken = []
    for link in _relative_links(path):
        target, _, anchor = link.partition("#")
        target_path = (path.parent / target).resolve() if target else path
        if not target_path.exists():
            broken.append(f"{link}: no file {target_path.relative_to(REPO) if target_path.is_relative_to(REPO) else target_path}")
            continue
        if anchor and target_path.suffix == ".md":
            anchors = _heading_anchors(target_path.read_text(encoding="utf-8"))
            if anchor not in anchors:
                broken.append(f"{link}: no heading #{anchor} in {target_path.name}")
    assert not broken, f"broken relative links in {path.relative_to(REPO)}:\n  " + "\n  ".join(broken)


# ---------------------------------------------------------------------------------------------------------------
# The decoder-block figure of docs/how-olica-works.md
# ---------------------------------------------------------------------------------------------------------------

FIGURE = DOCS / "images" / "olica-decoder-block.svg"


def test_block_figure_names_the_real_modules():
    """The figure shows every weight-carrying module of a pruned decoder layer, under its real name, and no other.

    A Qwen3 layer with factored Q/K and a calibration branch has every optional module (q_norm/k_norm included).
    """
    import xml.etree.ElementTree as ElementTree

    from optimum_olica.modeling import OlicaDecoderLayer, OlicaQwen3Config

    config = OlicaQwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_ranks=[4], key_ranks=[4], value_head_dims=[6],
        intermediate_sizes=[48], calibration_ranks=[2],
    )
    layer = OlicaDecoderLayer(config, 0)
    # Paths inside the layer, without the sub-block prefix the figure shows as a region ("self_attn", "mlp").
    modules = {
        re.sub(r"^(self_attn|mlp)\.", "", name)
        for name, module in layer.named_modules()
        if name and not list(module.children()) and list(module.parameters(recurse=False))
    }
    assert {"q_proj.down", "k_proj.up", "v_proj", "o_proj", "linear_calibration.up", "q_norm"} <= modules

    texts = [element.text or "" for element in ElementTree.parse(FIGURE).iter() if element.tag.endswith("text")]
    figure = " ".join(texts)
    absent = sorted(name for name in modules if not re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", figure))
    assert not absent, f"{FIGURE.name} does not show these modules of a pruned layer: {absent}"

    # Every module-name label (the first word of the monospace labels) is a real module path.
    labels = [
        (element.text or "").split()[0]
        for element in ElementTree.parse(FIGURE).iter()
        if element.tag.endswith("text") and element.get("class") == "name"
    ]
    unknown = sorted(label for label in labels if label not in modules)
    assert not unknown, f"{FIGURE.name} labels modules that a pruned layer does not have: {unknown}"
