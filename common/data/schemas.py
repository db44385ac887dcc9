"""The typed row schemas every loader produces, and their validation.

A row is a plain dict (cheap to put in a `datasets.Dataset`); the schema says which
string fields it must carry. Validation names file, line and field on failure, and a
whole file is checked before anything stops, so one run lists every bad row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from common.errors import DataError


@dataclass(frozen=True)
class Schema:
    name: str
    required: tuple[str, ...]
    may_be_empty: tuple[str, ...] = ()  # fields allowed to be "" (an SFT prompt on plain text)
    optional: tuple[str, ...] = ()
    # exact duplicate rows are dropped (counted): a repeated label would count twice;
    # repeated RL prompts are kept (counted): they only weight what is asked
    drop_duplicates: bool = True
    columns: tuple[tuple[str, str], ...] = ()  # (field, the user's column for it): --prompt_key ...

    def source(self, field: str) -> str:
        return dict(self.columns).get(field, field)

    def label(self, field: str) -> str:
        """How an error names a field: with the user's column and its flag when mapped."""
        column = self.source(field)
        return f"field '{field}'" if column == field else f"field '{field}' (column '{column}', --{KEY_FLAGS[field]})"


# the column-mapping flags (OpenRLHF's manner): a user's file is read as it is
KEY_FLAGS = {"prompt": "prompt_key", "response": "response_key", "chosen": "chosen_key",
             "rejected": "rejected_key", "revised": "revised_key"}


def with_columns(schema: Schema, cfg) -> Schema:
    """`schema` reading each field from the column its --FIELD_key names (empty: the field's name)."""
    columns = tuple((f, getattr(cfg, flag)) for f, flag in KEY_FLAGS.items()
                    if f in schema.required and getattr(cfg, flag, "") and getattr(cfg, flag) != f)
    return replace(schema, columns=columns)


SFT = Schema("sft", ("prompt", "response"), may_be_empty=("prompt",))
PAIR = Schema("pair", ("prompt", "chosen", "rejected"), may_be_empty=("prompt",))
REVISION = Schema("revision", ("prompt", "rejected", "revised"), may_be_empty=("prompt",))
PROMPT = Schema("prompt", ("prompt",), drop_duplicates=False, optional=("user",))  # user: VPL rewards
PERSONAL = Schema("personal", ("user", "prompt", "chosen", "rejected"), may_be_empty=("prompt",),
                  optional=("controversial", "survey"))

SCHEMAS = {s.name: s for s in (SFT, PAIR, REVISION, PROMPT, PERSONAL)}


def validate_row(row: object, schema: Schema, where: str) -> dict:
    """Return the row restricted to the schema's fields, or raise DataError naming the place."""
    if not isinstance(row, dict):
        raise DataError(where, f"expected a JSON object with fields {list(schema.required)}, "
                               f"got {type(row).__name__}")
    out = {}
    for key in schema.required:
        column, name = schema.source(key), schema.label(key)
        if column not in row:
            near = [k for k in row if k.lower().strip() == column or _close(k, column)]
            hint = (f" (found {near[0]!r}: misspelled?)" if near else
                    f"; row has {sorted(row)}" + ("" if key not in KEY_FLAGS or column != key else
                                                   f" (--{KEY_FLAGS[key]} COLUMN reads another column)"))
            raise DataError(f"{where}: {name}", f"missing{hint}")
        value = row[column]
        if not isinstance(value, str):
            raise DataError(f"{where}: {name}",
                            f"expected a string, got {type(value).__name__} {str(value)[:40]!r}")
        if not value.strip() and key not in schema.may_be_empty:
            raise DataError(f"{where}: {name}", "is empty")
        out[key] = value
    for key in schema.optional:
        if key in row:
            out[key] = row[key]
    return out


class RowErrors:
    """Every bad row of one source (the first SHOWN listed), raised together at the end."""
    SHOWN = 20

    def __init__(self, source: str):
        self.source, self.errors, self.count = source, [], 0

    def add(self, error: DataError) -> None:
        self.count += 1
        if len(self.errors) < self.SHOWN:
            self.errors.append(error)

    def raise_if_any(self) -> None:
        if self.count == 1:
            raise self.errors[0]
        if self.count:
            more = f"\n  ... and {self.count - self.SHOWN} more" if self.count > self.SHOWN else ""
            raise DataError(self.source, f"{self.count} bad rows:\n  " +
                            "\n  ".join(str(e) for e in self.errors) + more)


def _close(a: str, b: str) -> bool:
    """One edit apart (a typo), case-insensitively."""
    a, b = a.lower(), b.lower()
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1 or any(
            a[:i] + a[i + 1] + a[i] + a[i + 2:] == b for i in range(len(a) - 1))
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
