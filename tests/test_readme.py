"""What the README tells a newcomer to run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of the README section with this heading, to the next heading (code blocks hold none)."""
    fenced, taken = False, list[str]()
    for line in README.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = not fenced and line.startswith("#")
        if taken and heading:
            break
        if taken or (heading and line == title):
            taken.append(line)
    assert taken, title
    return "\n".join(taken)


def test_the_codex_exec_recipe_says_what_it_needs_outside_a_git_repository() -> None:
    text = section("### Codex CLI")
    assert 'codex exec "fix the failing test"' in text
    assert "Outside a git repository `codex exec` refuses to start" in text
    assert 'codex exec --skip-git-repo-check "fix the failing test"' in text
