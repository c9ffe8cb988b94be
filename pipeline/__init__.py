"""The captioning pipeline, in the order data flows:

    listing   list input shards at any fsspec URL
    sources   stream one shard's records (and the Shard and Record types)
    decode    image bytes -> an 8-bit PIL image, or a reason code
    stages    read + decode + crop to uint8, one shard per CPU task (Ray Data map_batches)
    captioner the GIT actor: normalise on its device, generate, decode text
    quality   caption quality flags (words, flags columns) for every output row
    sink      captioned rows -> Parquet data files, published atomically (the commit)
    views     derived from the committed files: the filtered view, WebDataset tars, the card (card)
    progress  manifests, run records and status beside the output
    runner    run_caption_job: the stages on Ray Data, waves of commits, exactly-once resume

`job` holds the CaptionJob contract; `scenes` makes synthetic captioned test data.
"""

from pipeline.job import CaptionJob, JobConfigError
from pipeline.progress import ConcurrentRunError, JobMismatchError, JobStatus, NoJobError, job_status
from pipeline.runner import ProgressUpdate, RunSummary, run_caption_job

__all__ = [
    "CaptionJob",
    "ConcurrentRunError",
    "JobConfigError",
    "JobMismatchError",
    "JobStatus",
    "NoJobError",
    "ProgressUpdate",
    "RunSummary",
    "job_status",
    "run_caption_job",
]
