"""Prompt templates for the five output formats and the judge rubric.

Every format asks the model to finish with one line ``The answer is: <answer>``. Documents are
shown as ``[DOC i] <title>\\n<text>`` blocks, ``i`` counting from 0.

=========  ===============================================================================
format     what the model writes before the answer line
=========  ===============================================================================
ao         nothing required (answer only)
id         the ids of the relevant documents, ``[DOC i]``, or ``[DOC -1]`` when none is
id_c       ``Relevant documents:`` then each cited document's id and full text
id_q       up to 10 lines ``Quote n: "<exact text>"`` (at most 30 words each), then
           ``Relevant Document IDs: [DOC i], ...``
r_judge    step-by-step reasoning that cites its sources as ``According to [DOC i]``
=========  ===============================================================================
"""
from __future__ import annotations

__all__ = ["FORMATS", "ANSWER_PREFIX", "format_document", "format_documents", "build_messages",
           "build_judge_messages"]

ANSWER_PREFIX = "The answer is:"

_SYSTEM = (
    "You answer questions using only the documents you are given. The documents were retrieved "
    "automatically: most of them are distractors, and the facts you need may be spread over "
    "several documents."
)

_INSTRUCTIONS = {
    "ao": (
        "Read the documents, then answer the question with a short phrase.\n"
        f"Write exactly one final line of the form:\n{ANSWER_PREFIX} <answer>"
    ),
    "id": (
        "First list the documents needed to answer the question, as [DOC i] tags separated by "
        "commas (write [DOC -1] if no document helps). Then answer with a short phrase.\n"
        "Example:\n[DOC 4], [DOC 17]\n"
        f"{ANSWER_PREFIX} <answer>"
    ),
    "id_c": (
        "First write the line 'Relevant documents:' and below it copy every document you need, "
        "each as its [DOC i] tag followed by the document's full text. Then answer with a short "
        "phrase.\nExample:\nRelevant documents:\n[DOC 4] <full text of document 4>\n"
        f"[DOC 17] <full text of document 17>\n{ANSWER_PREFIX} <answer>"
    ),
    "id_q": (
        "First quote the evidence: at most 10 lines, each 'Quote n: \"<text copied exactly from a "
        "document>\"', each quote at most 30 words. Then write 'Relevant Document IDs:' followed "
        "by the [DOC i] tags the quotes come from. Then answer with a short phrase.\n"
        "Example:\nQuote 1: \"<exact text>\"\nQuote 2: \"<exact text>\"\n"
        f"Relevant Document IDs: [DOC 4], [DOC 17]\n{ANSWER_PREFIX} <answer>"
    ),
    "r_judge": (
        "Reason step by step. Every time you use a fact, say where it comes from with "
        "'According to [DOC i], ...'. Then answer with a short phrase.\n"
        f"End with exactly one line of the form:\n{ANSWER_PREFIX} <answer>"
    ),
}

FORMATS = tuple(_INSTRUCTIONS)


def _check_format(fmt: str) -> None:
    if fmt not in _INSTRUCTIONS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def format_document(doc_id: int, title: str, text: str) -> str:
    """One context block: ``[DOC i] title`` on its own line, then the text."""
    head = f"[DOC {doc_id}] {title}".rstrip()
    return f"{head}\n{text.strip()}"


def _title_text(doc) -> tuple[str, str]:
    if isinstance(doc, dict):
        return doc.get("title", ""), doc["text"]
    return doc.title, doc.text


def format_documents(documents) -> str:
    """Blocks for ``[{"title", "text"}, ...]`` (or objects with ``.title`` and ``.text``), ids
    0..n-1 in list order, blank-line separated."""
    return "\n\n".join(format_document(i, *_title_text(d)) for i, d in enumerate(documents))


def user_prompt(question: str, documents: list[dict], fmt: str) -> str:
    _check_format(fmt)
    return (f"Documents:\n\n{format_documents(documents)}\n\n"
            f"Question: {question.strip()}\n\n{_INSTRUCTIONS[fmt]}")


def build_messages(question: str, documents: list[dict], fmt: str) -> list[dict]:
    """Chat messages ``[{"role": "system", ...}, {"role": "user", ...}]`` for one example."""
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": user_prompt(question, documents, fmt)}]


JUDGE_CRITERIA = (
    "Reasoning quality: the reasoning is coherent, step by step, and each step follows from "
    "the previous ones.",
    "Document grounding: every fact the reasoning uses is attributed with 'According to [DOC i]' "
    "to a document that really states it, and the relevant documents are among those cited.",
    "Answer correctness: the final answer means the same as the reference answer.",
)


def build_judge_messages(question: str, answers: list[str], relevant_documents: list[str],
                         response: str) -> list[dict]:
    """Rubric for the R+Judge reward. The judge must answer with three lines
    ``\\boxed{Criterion k: 1}`` or ``\\boxed{Criterion k: 0}``, k = 1, 2, 3."""
    criteria = "\n".join(f"Criterion {k}: {c}" for k, c in enumerate(JUDGE_CRITERIA, 1))
    docs = "\n\n".join(relevant_documents) if relevant_documents else "(none)"
    user = (
        f"Question: {question}\n\nReference answer(s): {' | '.join(answers)}\n\n"
        f"Relevant documents:\n{docs}\n\nResponse to grade:\n<<<\n{response}\n>>>\n\n"
        f"Grade the response on each criterion, 1 if it is met and 0 if not.\n{criteria}\n\n"
        "Reply with exactly three lines and nothing else:\n"
        "\\boxed{Criterion 1: 1 or 0}\n\\boxed{Criterion 2: 1 or 0}\n\\boxed{Criterion 3: 1 or 0}"
    )
    return [{"role": "system", "content": "You are a strict grader of answers to questions."},
            {"role": "user", "content": user}]
