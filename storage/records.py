"""mergesearch's own tables, in the study's database beside Optuna's: every evaluation a
trial ran (its split, engine, start and end), each item's output, scores and latency, and
every export of a trial.

Trials are Optuna's; these rows name them by study and trial number, the numbers users see.
An evaluation and its items are written in one transaction, so a crash leaves either the
whole evaluation or none of it. The schema is versioned with Alembic (its own version table,
apart from Optuna's): opening the store brings any database up to the current version.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    declared_attr,
    mapped_column,
    relationship,
)

from mergesearch.errors import StorageError

VERSION_TABLE = "mergesearch_alembic_version"
MIGRATIONS = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    pass


class _OfTrial:
    """A row about one trial, named by study and trial number, indexed on both."""

    id: Mapped[int] = mapped_column(primary_key=True)
    study: Mapped[str] = mapped_column(sa.String(512))
    trial: Mapped[int]

    @declared_attr.directive
    def __table_args__(cls) -> tuple:
        return (sa.Index(f"ix_{cls.__tablename__}_trial", "study", "trial"),)


class Evaluation(_OfTrial, Base):
    __tablename__ = "mergesearch_evaluations"

    split: Mapped[str] = mapped_column(sa.String(32))
    engine: Mapped[str] = mapped_column(sa.String(256))
    outcome: Mapped[str] = mapped_column(sa.String(16))  # complete, pruned or failed
    weights_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    error: Mapped[str | None] = mapped_column(sa.Text)  # why a failed evaluation failed
    started: Mapped[datetime]
    finished: Mapped[datetime]
    items: Mapped[list[ItemRecord]] = relationship(
        back_populates="evaluation", cascade="all, delete-orphan", order_by="ItemRecord.id")


class ItemRecord(Base):
    __tablename__ = "mergesearch_item_results"
    __table_args__ = (sa.UniqueConstraint("evaluation_id", "probe", "item_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(
        sa.ForeignKey("mergesearch_evaluations.id", ondelete="CASCADE"), index=True)
    probe: Mapped[str] = mapped_column(sa.String(256))
    item_id: Mapped[str] = mapped_column(sa.String(256))
    output: Mapped[str] = mapped_column(sa.Text)
    scores: Mapped[dict[str, float | None]] = mapped_column(sa.JSON)
    latency_s: Mapped[float]
    evaluation: Mapped[Evaluation] = relationship(back_populates="items")


class ExportRecord(_OfTrial, Base):
    __tablename__ = "mergesearch_exports"

    path: Mapped[str] = mapped_column(sa.Text)
    weights_sha256: Mapped[str] = mapped_column(sa.String(64))
    verified: Mapped[str] = mapped_column(sa.Text)  # "yes", or why the bytes were not compared
    created: Mapped[datetime]


@dataclass(frozen=True)
class ItemRow:
    """One item's result as the store takes it (evaluators' ItemResult fits)."""

    probe: str
    item_id: str
    output: str
    scores: dict[str, float]
    seconds: float


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # stored naive, in UTC


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN


def _text(value: str) -> str:
    """Text a model generated, storable everywhere (PostgreSQL text refuses NUL)."""
    return value.replace("\x00", "\ufffd")


class RecordStore:
    """Writes and reads mergesearch's tables through `engine` (the study database)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        upgrade(engine)

    @classmethod
    def open(cls, url: str) -> RecordStore:
        from storage.rdb import engine_for

        return cls(engine_for(url))

    def record_evaluation(self, study: str, trial: int, split: str, engine: str, outcome: str,
                          started: datetime, items: list[Any],
                          weights_sha256: str | None = None, error: str | None = None) -> int:
        """One evaluation with all its items, in one transaction; returns its id."""
        evaluation = Evaluation(
            study=study, trial=trial, split=split, engine=engine, outcome=outcome,
            weights_sha256=weights_sha256, error=error, started=started, finished=now(),
            items=[ItemRecord(probe=i.probe, item_id=_text(i.item_id), output=_text(i.output),
                              scores={k: _json_number(v) for k, v in i.scores.items()},
                              latency_s=i.seconds) for i in items])
        with Session(self.engine) as session, session.begin():
            session.add(evaluation)
            session.flush()
            return evaluation.id

    def evaluations(self, study: str, trial: int | None = None,
                    split: str | None = None) -> list[Evaluation]:
        """A study's evaluations, oldest first (items load when read)."""
        query = sa.select(Evaluation).where(Evaluation.study == study).order_by(Evaluation.id)
        if trial is not None:
            query = query.where(Evaluation.trial == trial)
        if split is not None:
            query = query.where(Evaluation.split == split)
        with Session(self.engine, expire_on_commit=False) as session:
            found = list(session.scalars(query))
            for evaluation in found:
                evaluation.items  # noqa: B018 - loaded while the session is open
            return found

    def record_export(self, study: str, trial: int, path: Path, weights_sha256: str,
                      verified: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(ExportRecord(study=study, trial=trial, path=str(path),
                                     weights_sha256=weights_sha256, verified=verified,
                                     created=now()))

    def exports(self, study: str) -> list[ExportRecord]:
        query = sa.select(ExportRecord).where(ExportRecord.study == study)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(query.order_by(ExportRecord.id)))


def _alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`. Workers starting together may race to create the
    tables; the loser finds them made and tries again."""
    for attempt in range(3):
        try:
            with engine.begin() as connection:
                command.upgrade(_alembic_config(connection), revision)
            return
        except SQLAlchemyError as e:
            if attempt == 2:
                reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
                raise StorageError(f"cannot create mergesearch's tables: {reason}") from None
            time.sleep(0.5 * (attempt + 1))


def downgrade(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), revision)


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()
