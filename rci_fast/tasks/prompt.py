"""The conversation format: system prompt, code blocks, interpreter results, chat rendering.

A conversation is a list of chat messages {"role", "content"} with roles system, user,
assistant and tool. An assistant turn that ends with a closed ```python block is followed by a
tool message holding the interpreter's output ("Code Execution Results:\n..."); the last
assistant turn gives the answer as <<<answer>>>.

The rollout engine appends interpreter output to the model's own stream as forced tokens, so when
a conversation is rendered as text the assistant turns and tool results after the user message
form ONE assistant message (render_chat / conversation_segments), the same text the engine sees.
"""
from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves problems by reasoning step by step. When computing, "
    "searching or checking would help, write Python code in a ```python ... ``` block; the code is "
    "run and its output comes back as \"Code Execution Results:\" followed by what it printed "
    "(stdout, then stderr). Use print() to see results. You may run code several times. When you "
    "are done, give the final answer as <<<answer>>>."
)
# Text-only mode (evaluation baseline): the same task, no interpreter.
TEXT_ONLY_SYSTEM_PROMPT = (
    "You are a helpful assistant that solves problems by reasoning step by step in text, without "
    "writing or running code. When you are done, give the final answer as <<<answer>>>."
)
RESULT_HEADER = "Code Execution Results:\n"
DEFAULT_MAX_RESULT_CHARS = 1024  # as the rollout engine's max_tool_output_chars

_CODE_BLOCK_RE = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The code of the last closed ```python block in an assistant turn, or None."""
    blocks = _CODE_BLOCK_RE.findall(text)
    return blocks[-1] if blocks else None


def format_result(stdout: str, stderr: str = "", status: str = "ok",
                  max_chars: int = DEFAULT_MAX_RESULT_CHARS, timeout_s: float = 10.0) -> str:
    """The tool message for one run: the header, then stdout and stderr, cut to max_chars.
    Byte for byte the text the rollout engine forces after a code block (its tool template adds
    the newline before and after, as merge_for_rendering does), so SFT data reads like rollouts."""
    out = stdout + stderr
    if status == "timeout":
        out += f"TimeoutError: the code ran longer than {timeout_s:g} s\n"
    elif status in ("memory_limit", "output_limit", "violation"):
        out += f"[sandbox: {status}]\n"
    if len(out) > max_chars:
        out = out[:max_chars] + "\n... (output truncated)\n"
    return RESULT_HEADER + out.rstrip("\n")


def build_messages(user_prompt: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}]


def merge_for_rendering(messages: list[dict]) -> list[dict]:
    """Merge each run of assistant/tool messages into one assistant message (see module doc)."""
    merged: list[dict] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "tool":
            content = "\n" + content + "\n"
        if role in ("assistant", "tool") and merged and merged[-1]["role"] == "assistant":
            merged[-1] = {"role": "assistant", "content": merged[-1]["content"] + content}
        else:
            merged.append({"role": "assistant" if role == "tool" else role, "content": content})
    return merged


# Used when a tokenizer has no chat template: ChatML, the format of the Qwen2.5 models of the paper.
DEFAULT_TEMPLATE_NAME = "chatml"


def _render_chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat(messages: list[dict], tokenizer=None, add_generation_prompt: bool = False) -> str:
    """The conversation as one string: through the tokenizer's chat template when it has one,
    else ChatML (<|im_start|>role\\n...<|im_end|>)."""
    merged = merge_for_rendering(messages)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(merged, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return _render_chatml(merged, add_generation_prompt)


def conversation_segments(messages: list[dict]) -> list[tuple[str, str, bool]]:
    """(kind, text, trainable) pieces of the ChatML rendering, in order, whose concatenation is
    render_chat(messages): prompt (not trained), model text (trained), interpreter output (not)."""
    segments: list[tuple[str, str, bool]] = []
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                     for m in messages if m["role"] in ("system", "user"))
    segments.append(("prompt", prompt + "<|im_start|>assistant\n", False))
    body = [m for m in messages if m["role"] in ("assistant", "tool")]
    if any(m["role"] in ("system", "user") for m in messages[len(messages) - len(body):]):
        raise ValueError("segments expect system/user messages first, then assistant/tool turns")
    for m in body:
        if m["role"] == "assistant":
            segments.append(("model", m["content"], True))
        else:
            segments.append(("tool", "\n" + m["content"] + "\n", False))
    segments.append(("model", "<|im_end|>\n", True))  # the model learns to stop
    return segments
