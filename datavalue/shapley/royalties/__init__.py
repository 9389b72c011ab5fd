"""Royalties: from values to exact-cent payments, an audit trail and reports.

* ``_split``: versioned royalty policies and :func:`split_royalties` (largest remainder to the
  cent; amounts plus unallocated always equal the pool).
* ``_records``: the stored row of one output's split (:class:`GenerationRecord`) and the
  half-open :class:`Period` that selects rows; shared by the two modules below.
* ``_ledger``: :class:`RoyaltyLedger`, the append-only, hash-chained JSON-lines file (record,
  replay, verify, statement); ``_anchor``: its head file, lock and MAC; ``_recovery``: a torn last
  line (refused on read, moved aside by ``recover``), a head file left without its ledger, and
  keeping the old head aside for ``reanchor``; ``_record_checks``: the checks of ``record``'s inputs.
* ``_statement``: :class:`PeriodStatement` per owner for a period (share-then-sum or
  average-then-share), reconciled to the cent.
* ``_owners``: :class:`OwnerRegistry`, works to owners, merging shell owners.
* ``_report``: JSON, CSV and self-contained HTML reports; ``_svg``: the inline charts.

Dependencies point one way: ``_split`` and ``_records`` know nothing of the ledger; the
ledger builds statements; reports read statements.
"""

from datavalue.shapley.royalties._anchor import owned_by as owned_by
from datavalue.shapley.royalties._ledger import RoyaltyLedger as RoyaltyLedger
from datavalue.shapley.royalties._outpath import check_output_path as check_output_path
from datavalue.shapley.royalties._owners import OwnerRegistry as OwnerRegistry
from datavalue.shapley.royalties._records import GenerationRecord as GenerationRecord
from datavalue.shapley.royalties._records import Period as Period
from datavalue.shapley.royalties._report import infer_format as infer_format
from datavalue.shapley.royalties._report import render_report as render_report
from datavalue.shapley.royalties._report import write_report as write_report
from datavalue.shapley.royalties._split import RoyaltyPolicy as RoyaltyPolicy
from datavalue.shapley.royalties._split import RoyaltySplit as RoyaltySplit
from datavalue.shapley.royalties._split import available_policies as available_policies
from datavalue.shapley.royalties._split import exact_sum as exact_sum
from datavalue.shapley.royalties._split import get_policy as get_policy
from datavalue.shapley.royalties._split import register_policy as register_policy
from datavalue.shapley.royalties._split import split_royalties as split_royalties
from datavalue.shapley.royalties._statement import GenerationLine as GenerationLine
from datavalue.shapley.royalties._statement import OwnerLine as OwnerLine
from datavalue.shapley.royalties._statement import PeriodStatement as PeriodStatement

__all__ = [
    "GenerationLine",
    "GenerationRecord",
    "OwnerLine",
    "OwnerRegistry",
    "Period",
    "PeriodStatement",
    "RoyaltyLedger",
    "RoyaltyPolicy",
    "RoyaltySplit",
    "available_policies",
    "exact_sum",
    "get_policy",
    "infer_format",
    "register_policy",
    "render_report",
    "split_royalties",
    "write_report",
]
