"""Grading: a response's final answer in its expected form, judged against a gold answer.

The router (confidence from the answer form, judged escalations and audits), eval (graded
workloads) and DREAM (teacher labels, validation) all grade with these; it imports
nothing of dreamroute but its errors.
"""

from .graders import (ChoiceGrader, ExactGrader, Grade, Grader, NumberGrader, format_number, get_grader,
                      grader_names, normalize_text, parse_number)

__all__ = ["ChoiceGrader", "ExactGrader", "Grade", "Grader", "NumberGrader", "format_number", "get_grader",
           "grader_names", "normalize_text", "parse_number"]
