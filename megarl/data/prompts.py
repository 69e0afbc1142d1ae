"""Prompt templates. Rows store chat messages; they become text through the tokenizer's chat template (instruct
models) or a raw template (base models), followed by an optional generation prefix such as ``<think>``."""

from __future__ import annotations

KK_SYSTEM = ("You are a careful logician. The user gives you a Knights-and-Knaves puzzle. First reason step by step "
             "inside <think> </think> tags, then give the final answer inside <answer> </answer> tags, naming the "
             "role of every inhabitant on its own numbered line, for example:\n"
             "<answer> (1) Zoey is a knight\n(2) Oliver is a knave </answer>")
BASE_TEMPLATE = ("A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
                 "The Assistant first thinks about the reasoning process in <think> </think> tags and then gives the "
                 "answer in <answer> </answer> tags, one line per inhabitant, e.g. <answer> (1) Zoey is a knight\n"
                 "(2) Oliver is a knave </answer>.\nUser: {question}\nAssistant:")
TEMPLATES = ("instruct", "base")


def render_prompt(messages: list[dict], tokenizer=None, raw_template: str | None = None,
                  generation_prefix: str = "") -> str:
    """Text of a prompt: ``raw_template`` with ``{question}`` replaced by the last user message when given, else
    the tokenizer's chat template with the generation prompt; then ``generation_prefix``. Only ``{question}`` is
    replaced: other braces (LaTeX's ``\\boxed{}``, JSON) are the template's own text, not format fields."""
    if raw_template is not None:
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if question is None or "{question}" not in raw_template:
            raise ValueError("extra_info.raw_template needs a user message and a '{question}' placeholder "
                             f"(got {raw_template[:60]!r}).")
        return raw_template.replace("{question}", question) + generation_prefix
    if tokenizer is None:
        raise ValueError("render_prompt needs a tokenizer (for its chat template) or a raw_template.")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return text + generation_prefix
