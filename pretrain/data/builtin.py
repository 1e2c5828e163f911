"""The corpora that ship with the install, which a source names instead of files.

`python-docs`: the documentation text bundled with every Python install, the corpus that needs
no download. Read from source with `ast`, never by importing modules (some have side effects on
import, e.g. `antigravity` opens a browser)."""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from typing import Callable, Iterator

# Test suites and demo/tool packages: mostly code fixtures, not documentation.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo",
              "lib2to3", "ensurepip", "__pycache__", "config-3"}
MIN_DOCSTRING_CHARS = 40


def python_docs_documents() -> Iterator[str]:
    """Yield the pydoc topic pages, then one document per standard-library module made of its
    module, class and function docstrings. The order is fixed for a given Python version."""
    yield from _python_docs()


# The corpora a source's `path` may name instead of files: name -> its documents. The config
# (pretrain/config/schema.py) checks `path` against these names.
BUILTIN_SOURCES: dict[str, Callable[[], Iterator[str]]] = {"python-docs": python_docs_documents}


@functools.cache
def _python_docs() -> tuple[str, ...]:
    # ~2 MB of text, but parsing the standard library takes seconds: read it once per process.
    return (*_pydoc_topics(), *_stdlib_docstrings(sysconfig.get_paths()["stdlib"]))


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def _stdlib_docstrings(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            doc = _module_document(path, module)
            if doc:
                yield doc


def _module_document(path: str, module: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    module_doc = ast.get_docstring(tree)
    parts.append(f"Module {module}" + (f"\n\n{module_doc}" if module_doc else ""))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if doc and len(doc) >= MIN_DOCSTRING_CHARS:
            kind = "class" if isinstance(node, ast.ClassDef) else "def"
            parts.append(f"{kind} {node.name}\n{doc}")
    return "\n\n".join(parts) if len(parts) > 1 or module_doc else None
