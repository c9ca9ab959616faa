"""grading.py: is a completion's answer right? math-verify on the last \\boxed{}, after the reasoning block.

    is_correct("... so \\boxed{\\frac12}", "0.5")   → True
    answer_part("<think>… \\boxed{3} …</think> The answer is \\boxed{4}")
        → (" The answer is \\boxed{4}", True)

A thinking model's completion is graded on what follows its reasoning block; one that never closes the
block (cut inside its reasoning) is wrong, whatever tentative \\boxed{} it wrote mid-thought.
Also: the unbiased pass@k. A world's exact checker (worlds/) is passed in by the caller, which looks it up by
name.
"""
import atexit
import concurrent.futures
import dataclasses
import math
import multiprocessing
import re
import threading

THINK_END = "</think>"

GRADE_TIMEOUT = 5  # seconds per math-verify parse / comparison
FALLBACK_CHARS = 300  # no \boxed{}: the completion's tail, anchored answers only ("the answer is 42")

DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\[,;:! ]|~|\s)+(?=\d{3}(?!\d))")  # 1\,000 and 1 000 → 1000
BOX_START = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])(\s*)")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} or \\fbox{...} (nested braces, `\\boxed {x}`, `\\boxed
    5`)."""
    found = None
    for m in BOX_START.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "\\":  # \{ and \} are characters, not braces
                    j += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    found = text[i + 1:j]
                    break
                j += 1
        elif m.group(1) and (word := re.match(r"-?[\w.]*\w|\\[a-zA-Z]+", text[i:])):
            found = word.group()  # "\boxed 5" (a space, then one number, word or command)
    return None if found is None else found.strip()


def _grade(completion: str, gold: str, timeout: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    answer = extract_boxed(completion)
    answer, gold = (DIGIT_GROUP_SPACE.sub("", x) if x else x for x in (answer, gold))
    if answer == "":
        return False
    if answer is not None and " ".join(answer.split()) == " ".join(gold.split()):
        return True
    if answer is not None:
        pred = parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
    else:  # no box: only an answer the text announces counts, never a stray last number
        anchored = [LatexExtractionConfig(try_extract_without_anchor=False),
                    ExprExtractionConfig(try_extract_without_anchor=False)]
        pred = parse(completion[-FALLBACK_CHARS:], anchored, fallback_mode="no_fallback",
                     parsing_timeout=timeout)
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
    if not pred or not gold_parsed:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=timeout, allow_set_relation_comp=True))


_pool = None


def _grade_off_main_thread(completion: str, gold: str, timeout: int) -> bool:
    """math-verify's timeouts use SIGALRM, which only the main thread gets: grade in a helper process
    instead."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_pool.shutdown)
    try:
        return _pool.submit(_grade, completion, gold, timeout).result(timeout=6 * timeout + 60)
    except concurrent.futures.TimeoutError:
        for p in list(_pool._processes.values()):  # stuck beyond math-verify's own timeouts
            p.kill()
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
        return False


def is_correct(completion: str, gold: str, timeout: int = GRADE_TIMEOUT) -> bool:
    """The last \\boxed{} of `completion` (else its tail) matches `gold` under math-verify, gold first.

    Never raises: malformed text, unparsable answers and timeouts (pathological expressions) are False.
    """
    try:
        if threading.current_thread() is not threading.main_thread():
            return _grade_off_main_thread(completion, gold, timeout)
        return _grade(completion, gold, timeout)
    except Exception:
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def answer_part(completion: str) -> tuple[str, bool]:
    """(the text after the last reasoning block, whether a block was closed); the whole text when none was."""
    head, sep, tail = completion.rpartition(THINK_END)
    return (tail, True) if sep else (completion, False)


def grade(samples: list[dict], question: str, gold: str, checker=None, thinking: bool = False):
    """Sets each sample's "extracted" answer and "correct" verdict. checker: a world's exact checker
    (worlds.get(name).check: its parsed "check" is stored too), None for math-verify against gold.
    With thinking on, a completion whose reasoning block never closed is wrong and flagged."""
    for s in samples:
        answer, closed = answer_part(s["completion"])
        if thinking:
            s["reasoning_closed"] = closed
        s["extracted"] = extract_boxed(answer)
        if thinking and not closed:
            s["correct"] = False
        elif checker is not None:
            s["check"] = dataclasses.asdict(checker(question, answer))
            s["correct"] = s["check"]["correct"]
        else:
            s["correct"] = is_correct(answer, gold)
