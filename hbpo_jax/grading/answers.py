"""Answer extraction and grading for math RL rewards; model output is hostile input.

Pipeline per response:
  1. `extract_answer`: the last `\\boxed{}` / `\\fbox{}` of the answer part, which the answer-format
     policy (FORMATS) picks: "paper" (HBPO's, the default): the text after the first `</think>`,
     no `</think>` = format error; "lenient" (chat models that answer without thinking tags): the
     same when the response has `</think>`, the whole response when it has no `<think>` at all,
     and a format error when a think block is opened but never closed (a response cut off
     mid-thought is not an answer). Linear time (one regex scan + one brace scan), no recursion.
     Missing -> format error.
  2. `cheap_match` (in the calling process, bounded: answers over MAX_ANSWER_CHARS only get an
     exact comparison): exact match, normalised string match, exact rational comparison,
     element-wise comparison of tuples / intervals. Returns True / False, or None when only
     symbolic work can decide.
  3. `symbolic_match` (math-verify / sympy): can be slow or hang (a big-int power runs in C,
     where no signal can interrupt it), so it runs only where a timeout can stop it: in worker
     processes that the parent kills when late (`grade_batch`), or under a SIGALRM timer in the
     main thread (`grade`, `grade_batch(workers=0)`); both are hbpo_jax.grading.pool's.
     `symbolic_safe` first refuses power towers and huge exponents.

Normalisation choices (what a careful human grader accepts), see `normalize`:
  - spacing (`\\!`, `\\,`, `\\;`, `\\quad`, `~`, whitespace), `$`, `\\left`/`\\right`, `\\displaystyle`
    are dropped; `\\text{}`, `\\mbox{}`, `\\mathrm{}`, `\\textbf{}` ... are unwrapped.
  - `\\dfrac`, `\\tfrac` -> `\\frac`; `\\frac12` -> `\\frac{1}{2}`; `\\sqrt2` -> `\\sqrt{2}`.
  - a trailing unit word (cm, meters, dollars, degrees, ...) is dropped when it is separated by
    a space (or came from `\\text{}`) and a number precedes it: `5 \\text{ cm}` == `5`, but `2m`
    keeps its `m` (m may be a variable). Degree signs (`^\\circ`, `°`, `\\degree`) are dropped.
  - trailing periods, a leading `x =` / `\\theta =` (single variable, single `=`), thousands
    separators (`1,000`, `1{,}000`, `1\\,000`) and `\\$` are dropped; pure word answers are
    compared case-insensitively; `(B)` == `B` for a single letter choice.
  - numbers compare as exact rationals: `0.50` == `.5` == `\\frac{1}{2}` == `1/2`, but
    `0.333` != `\\frac{1}{3}` (no rounding: a truncated decimal is not the value).
  - percentages: `p\\%` stands for the number p (sign omitted) or the value p/100, so against
    truth `50\\%` the answers `50\\%`, `50` and `0.5` are right; against truth `50` the answer
    `50\\%` is right (notation) but `0.5` is wrong; against truth `0.5`, `50\\%` is right.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from fractions import Fraction
from typing import Sequence

from hbpo_jax.grading import pool as grading_pool
from hbpo_jax.grading.pool import symbolic_match, symbolic_with_alarm

__all__ = [
    "GradeResult", "extract_answer", "normalize", "cheap_match", "symbolic_safe",
    "symbolic_match", "symbolic_with_alarm", "grade", "grade_batch", "MAX_ANSWER_CHARS", "FORMATS",
    "answer_part",
]

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 512      # longer answers get an exact comparison only
MAX_EXPONENT_DIGITS = 4     # 9999^9999 (~40k digits) is fine for sympy; 9^99999 is not
_MAX_LOGGED = 5             # per grade_batch call; the rest are only counted

_THINK_START, _THINK_END = "<think>", "</think>"
# Answer-format policies (config grading.format): where the answer may stand in a response.
FORMATS = ("paper", "lenient")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Escaped braces and backslashes are not grouping characters; match them as one token.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response.

    format_ok: the response has a box where the answer-format policy looks (paper: after
      `</think>`; lenient: after `</think>`, or anywhere when no think block was opened).
    correct: the boxed answer matches the ground truth (always False if not format_ok).
    extracted: the boxed answer, or None.
    status: "ok"; "refused" (hostile answer, symbolic step skipped); "skipped" (symbolic step
      impossible: no timeout available off the main thread); "timeout", "crash", "error".
    latency_s: grading time of this item (not part of equality).
    """
    format_ok: bool
    correct: bool
    extracted: str | None
    status: str = "ok"
    latency_s: float = dataclasses.field(default=0.0, compare=False)


# ----------------------------------------------------------------------------------------
# Extraction.

def _match_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the group whose content starts at `start`; None if unbalanced.

    Iterative and linear: only brace tokens are visited, never recursed into.
    """
    depth = 1
    for tok in _BRACE_TOKEN.finditer(text, start):
        t = tok.group()
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return tok.start()
    return None


def answer_part(text: str, answer_format: str = "paper") -> str | None:
    """The part of a response the answer is read from, under `answer_format` (FORMATS), or None
    when the response breaks the format (see the module docstring)."""
    if answer_format not in FORMATS:
        raise ValueError(f"answer_format must be one of {FORMATS}, got {answer_format!r}.")
    cut = text.find(_THINK_END)
    if cut >= 0:
        return text[cut + len(_THINK_END):]
    if answer_format == "lenient" and _THINK_START not in text:
        return text
    return None  # paper: no </think>; lenient: a think block opened and never closed


def extract_answer(text: str, answer_format: str = "paper") -> str | None:
    """The last `\\boxed{...}` / `\\fbox{...}` content of the answer part (`answer_part`), else None.

    `\\boxed {x}` spacing and nested braces are handled; escaped braces `\\{ \\}` do not count;
    an unbalanced last box gives None. Linear time in len(text).
    """
    if not isinstance(text, str):
        return None
    tail = answer_part(text, answer_format)
    if tail is None:
        return None
    last = None
    for last in _BOX_OPEN.finditer(tail):
        pass
    if last is None:
        return None
    end = _match_brace(tail, last.end())
    return None if end is None else tail[last.end():end].strip()


# ----------------------------------------------------------------------------------------
# Normalisation and cheap comparison.

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|textsf|mathrm|mathbf|mathit|"
                       r"mathsf|mbox|operatorname)\s*\{")
_DROP = re.compile(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle|textstyle|quad|qquad)(?![a-zA-Z])"
                   r"|\\[!,;: ]|~")
_UNITS = ("cm|mm|km|m|meters?|metres?|centimeters?|kilometers?|in|inch|inches|ft|feet|foot|"
          "yd|yards?|mi|miles?|mph|kg|g|grams?|kilograms?|lb|lbs|pounds?|oz|ounces?|s|sec|"
          "seconds?|min|minutes?|h|hr|hrs|hours?|days?|weeks?|months?|years?|dollars?|cents?|"
          "units?|sq|square|degrees?|deg|liters?|litres?|ml|L|people|students|cubic")
# At most two unit words ("square feet"), each a literal: no nested quantifier, no blow-up.
_UNIT = r"(?:" + _UNITS + r")(?![A-Za-z])(?:\^\{?[23]\}?)?"
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s+" + _UNIT + r"(?:\s+" + _UNIT + r")?\s*$")
_PERCENT_WORD = re.compile(r"\s*percent$")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_LEADING_VAR = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:=|\\in(?![a-zA-Z]))")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH = re.compile(r"([^/]+)/([^/]+)")
_WORDS = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_UNICODE = {"π": r"\pi", "−": "-", "×": r"\times", "·": r"\cdot", "√": r"\sqrt", "∞": r"\infty"}


def _unwrap_text(s: str) -> str:
    """Replace `\\text{X}` (and friends) by ` X `; unbalanced -> leave the rest as is."""
    out, pos = [], 0
    while True:
        m = _TEXT_CMD.search(s, pos)
        if m is None:
            out.append(s[pos:])
            return "".join(out)
        end = _match_brace(s, m.end())
        if end is None:
            out.append(s[pos:])
            return "".join(out)
        # Inner wrappers (`\text{\textbf{x}}`) are handled by re-scanning the content later.
        out.append(s[pos:m.start()] + " " + s[m.end():end] + " ")
        pos = end + 1


def normalize(ans: str) -> str:
    """Canonical string form of a short answer (see the module docstring for the rules).

    Answers longer than MAX_ANSWER_CHARS are returned stripped but otherwise untouched.
    """
    s = ans.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = s.replace(r"\$", "").replace("$", "").replace(r"\%", "%")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for _ in range(4):  # nested wrappers, bounded
        t = _unwrap_text(s)
        if t == s:
            break
        s = t
    s = _DROP.sub(" ", s)
    s = _DEGREE.sub("", s)
    s = s.strip().rstrip(".").strip()
    s = _TRAILING_UNIT.sub("", s)
    s = _PERCENT_WORD.sub("%", s)
    if _WORDS.fullmatch(s):  # a word answer ("Monday", "no solution")
        return " ".join(s.lower().split())
    s = "".join(s.split())
    s = s.replace("{,}", ",")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if s.count("=") == 1 or (s.count("=") == 0 and r"\in" in s):
        s = _LEADING_VAR.sub("", s, count=1)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = re.fullmatch(r"\(([A-Za-z])\)", s)
    if m:
        s = m.group(1)
    return s.rstrip(".")


def _to_number(s: str) -> Fraction | None:
    """Exact value of a plain decimal, `\\frac{a}{b}` or `a/b` (a, b plain numbers), else None."""
    if len(s) > 100:
        return None
    try:
        if _NUMBER.fullmatch(s):
            return Fraction(s)
        m = _FRAC.fullmatch(s)
        if m and _NUMBER.fullmatch(m.group(2)) and _NUMBER.fullmatch(m.group(3)):
            v = Fraction(m.group(2)) / Fraction(m.group(3))
            return -v if m.group(1) else v
        m = _SLASH.fullmatch(s)
        if m and _NUMBER.fullmatch(m.group(1)) and _NUMBER.fullmatch(m.group(2)):
            return Fraction(m.group(1)) / Fraction(m.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _split_top(s: str) -> list[str] | None:
    """Top-level comma split of a bracketed tuple/interval body; None if braces don't nest."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return None
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts if depth == 0 else None


def _numbers_match(p: str, t: str) -> bool | None:
    """Compare as numbers with the percent rule; None if either side is not a plain number."""
    p_pct, t_pct = p.endswith("%"), t.endswith("%")
    vp, vt = _to_number(p.rstrip("%")), _to_number(t.rstrip("%"))
    if vp is None or vt is None:
        return None
    if p_pct == t_pct:
        return vp == vt
    pct, plain = (vp, vt) if p_pct else (vt, vp)
    return plain in (pct, pct / 100)


def _cheap(p: str, t: str, depth: int) -> bool | None:
    if p == t:
        return True
    num = _numbers_match(p, t)
    if num is not None:
        return num
    if p.rstrip("%") == t.rstrip("%") and p.rstrip("%"):
        return True
    # Tuples / intervals: same brackets, same arity, element-wise (one level deep).
    if depth == 0 and len(p) >= 2 and len(t) >= 2 and p[0] == t[0] and p[-1] == t[-1] \
            and p[0] in "([" and p[-1] in ")]":
        ep, et = _split_top(p[1:-1]), _split_top(t[1:-1])
        if ep is not None and et is not None and len(ep) == len(et) and len(ep) > 1:
            verdicts = [_cheap(a, b, depth + 1) for a, b in zip(ep, et)]
            if all(v is True for v in verdicts):
                return True
            if any(v is False for v in verdicts) and all(v is not None for v in verdicts):
                return False
    return None


def cheap_match(pred: str, truth: str) -> bool | None:
    """Bounded, fast comparison: True / False when decided, None when symbolic work is needed.

    Over-long answers (> MAX_ANSWER_CHARS) are decided by exact comparison alone.
    """
    if pred.strip() == truth.strip():
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(truth) > MAX_ANSWER_CHARS:
        return False
    return _cheap(normalize(pred), normalize(truth), 0)


# ----------------------------------------------------------------------------------------
# The guard in front of symbolic comparison (which grading_pool bounds in time).

_POWER = re.compile(r"\^|\*\*")
_EXP_TOKEN = re.compile(r"[+-]?\d+|\\[a-zA-Z]+|.", re.DOTALL)


def _exponent_at(s: str, i: int) -> tuple[str, int]:
    """Exponent text starting at s[i] (after `^`), and the index just past it."""
    while i < len(s) and s[i].isspace():
        i += 1
    if i >= len(s):
        return "", i
    if s[i] == "{":
        end = _match_brace(s, i + 1)
        return (s[i + 1:], len(s)) if end is None else (s[i + 1:end], end + 1)
    m = _EXP_TOKEN.match(s, i)
    return m.group(), m.end()


def symbolic_safe(ans: str) -> bool:
    """False for answers symbolic work must not touch: too long, power towers, huge powers.

    Refused: > MAX_ANSWER_CHARS; an exponent that itself holds a power or a factorial, or that
    is followed by another `^` (`9^9^9`); an exponent with more than MAX_EXPONENT_DIGITS
    digits in total; a factorial of a number with more than 4 digits.
    """
    if len(ans) > MAX_ANSWER_CHARS:
        return False
    if re.search(r"\d{5,}\s*!", ans):
        return False
    for m in _POWER.finditer(ans):
        exp, end = _exponent_at(ans, m.end())
        if _POWER.search(exp) or "!" in exp or sum(c.isdigit() for c in exp) > MAX_EXPONENT_DIGITS:
            return False
        rest = ans[end:].lstrip()
        if rest.startswith("^") or rest.startswith("**"):
            return False
    return True


def _cheap_stage(extracted: str | None, truth: str) -> GradeResult | None:
    """Everything but symbolic work. None means: needs symbolic_match (and is safe for it)."""
    if extracted is None:
        return GradeResult(False, False, None)
    verdict = cheap_match(extracted, truth)
    if verdict is not None:
        return GradeResult(True, verdict, extracted)
    if not (symbolic_safe(extracted) and symbolic_safe(truth)):
        return GradeResult(True, False, extracted, "refused")
    return None


def grade(response: str, ground_truth: str, *, timeout_s: float = 5.0,
          answer_format: str = "paper") -> GradeResult:
    """Grade one response in this process (answer_format: a FORMATS policy).

    The symbolic step runs under a SIGALRM timer, so only in the main thread; elsewhere it is
    skipped (status "skipped"). Not protected against hangs inside C code: for untrusted
    batches use `grade_batch`, which kills late workers.
    """
    t0 = time.perf_counter()
    extracted = extract_answer(response, answer_format)
    try:
        res = _cheap_stage(extracted, str(ground_truth))
    except Exception:
        log.exception("grading failed")
        return GradeResult(extracted is not None, False, extracted, "error")
    if res is None:
        ok, status = symbolic_with_alarm(extracted, ground_truth, timeout_s)
        res = GradeResult(True, ok, extracted, status)
    return dataclasses.replace(res, latency_s=time.perf_counter() - t0)


def _report(problems: list[tuple[int, str, str | None]]) -> None:
    """Bounded logging of items that timed out, crashed or errored."""
    for i, status, extracted in problems[:_MAX_LOGGED]:
        shown = None if extracted is None else extracted[:80]
        log.warning("grading item %d: %s (answer %r)", i, status, shown)
    if len(problems) > _MAX_LOGGED:
        log.warning("grading: %d more items failed (not shown)", len(problems) - _MAX_LOGGED)


def grade_batch(responses: Sequence[str], truths: Sequence[str], *, workers: int | None = None,
                timeout_s: float = 5.0, pool: grading_pool.GradingPool | None = None,
                answer_format: str = "paper") -> list[GradeResult]:
    """Grade many responses; results in input order. Never raises for an item.

    Extraction and cheap matching run here (bounded); only undecided, safe items go to the
    symbolic step, in worker processes (`pool`, or the module's shared pool of `workers`
    processes, default min(4, cpu count), kept between calls), each item bounded by timeout_s + 0.5 s: a late worker is
    killed and replaced, its item graded correct=False with status "timeout" (a dead worker:
    "crash"), and logged. workers=0 runs the symbolic step inline under a SIGALRM timer (main
    thread only, no protection against hangs inside C code).

    Args:
      responses: model outputs; truths: ground-truth answers (same length).
      answer_format: where the answer is read (FORMATS: "paper" or "lenient").
    Raises:
      ValueError: the two sequences differ in length, or an unknown answer_format.
    """
    if len(responses) != len(truths):
        raise ValueError(f"{len(responses)} responses but {len(truths)} truths")
    if answer_format not in FORMATS:
        raise ValueError(f"answer_format must be one of {FORMATS}, got {answer_format!r}.")
    results: list[GradeResult | None] = [None] * len(responses)
    symbolic: list[tuple[int, str, str]] = []
    problems: list[tuple[int, str, str | None]] = []
    for i, (resp, truth) in enumerate(zip(responses, truths)):
        t0 = time.perf_counter()
        extracted = extract_answer(resp, answer_format)
        try:
            res = _cheap_stage(extracted, str(truth))
        except Exception:  # a bug here must not cost the other items
            res = GradeResult(extracted is not None, False, extracted, "error")
            problems.append((i, "error", extracted))
        if res is None:
            symbolic.append((i, extracted, str(truth)))
        else:
            results[i] = dataclasses.replace(res, latency_s=time.perf_counter() - t0)
    if symbolic:
        items = [(p, t) for _, p, t in symbolic]
        if workers == 0 and pool is None:
            outs = []
            for p, t in items:
                t0 = time.perf_counter()
                ok, status = symbolic_with_alarm(p, t, timeout_s)
                outs.append((ok, status, time.perf_counter() - t0))
        else:
            n = workers if workers is not None else min(4, os.cpu_count() or 1)
            outs = (pool or grading_pool.shared_pool(max(n, 1))).map(items, timeout_s)
        for (i, pred, _), (ok, status, secs) in zip(symbolic, outs):
            results[i] = GradeResult(True, ok, pred, status, secs)
            if status in ("timeout", "crash", "error"):
                problems.append((i, status, pred))
    _report(problems)
    return results  # type: ignore[return-value]
