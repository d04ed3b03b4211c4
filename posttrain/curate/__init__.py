"""Data curation on words: dedup (exact and MinHash near-duplicates), train/eval contamination, a stratification
audit, inter-rater agreement (Cohen's kappa) and the length bias of preference pairs.

Everything works on the normalised words of a row (see ``row_text``), so no tokenizer is needed and the numbers are
the same on every machine. Hashes are blake2b, never Python's ``hash()``, which is salted per process.
``curate.prm_labels`` (Math-Shepherd step labels for a PRM) is the exception: it samples from a model, and is
imported from its module.

Layer 6 (curate): may import posttrain.data, models, rollout, rewards, errors and io; never config.
"""

from posttrain.curate.agreement import LANDIS_KOCH, AgreementReport, Kappa, agreement, cohen_kappa, landis_koch
from posttrain.curate.arithmetic import write_arithmetic
from posttrain.curate.audit import MISSING, UNITS, AuditReport, Bin, LengthBias, audit, get_field, length_bias
from posttrain.curate.contamination import ContaminationReport, EvalLeak, contamination
from posttrain.curate.dedup import DedupReport, Removed, dedup_file, dedup_rows, write_jsonl
from posttrain.curate.minhash import band_rows_for, estimate_jaccard, jaccard, minhash
from posttrain.curate.text import (
    PLAIN_FIELDS,
    check_fraction,
    message_contents,
    ngrams,
    normalize,
    raw_text,
    row_text,
)

__all__ = ["LANDIS_KOCH", "MISSING", "PLAIN_FIELDS", "UNITS", "AgreementReport", "AuditReport", "Bin",
           "ContaminationReport", "DedupReport", "EvalLeak", "Kappa", "LengthBias", "Removed", "agreement", "audit",
           "band_rows_for", "check_fraction", "cohen_kappa", "contamination", "dedup_file", "dedup_rows",
           "estimate_jaccard", "get_field", "jaccard", "landis_koch", "length_bias", "message_contents", "minhash",
           "ngrams", "normalize", "raw_text", "row_text", "write_arithmetic", "write_jsonl"]
