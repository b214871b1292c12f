"""The published repo as its users read it: `datasets.load_dataset` of a snapshot of the repo (the local Hub stub),
whose config's files share one schema."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from hub_parts import REPO, RUN, Writer, ckpt, client, make_rows, sleeps  # noqa: F401  (fixtures: ckpt...)
from test_hub import RUN_INFO

from vlm_caption.store import OUTPUT_SCHEMA, list_parts

OLD_COLUMNS = [n for n in OUTPUT_SCHEMA.names if n not in ("caption_flags", "caption_attempts")]  # of 0.1


def load_snapshot(stub, tmp_path):
    """load_dataset of the repo downloaded by the real client, as a user on the Hub gets it."""
    import datasets
    from huggingface_hub import snapshot_download

    local = snapshot_download(REPO, repo_type="dataset", endpoint=stub.endpoint, token=stub.token,
                              cache_dir=tmp_path / "dl")
    return datasets.load_dataset(local, split="train", cache_dir=str(tmp_path / "ds_cache"))


def test_a_01_dir_pushing_its_old_parts_moves_the_old_files_with_the_columns_of_the_new_ones(hub_stub, client,
                                                                                          ckpt, tmp_path):  # noqa: F811
    """A dir of 0.1 resumed by this version: its pending parts lack caption_flags and caption_attempts. Its 0.1
    files were moved with the columns of the first pending part (none of the two), the new files had them:
    the config's files disagreed (the Hub's viewer wants one schema) and load_dataset gave the old rows no
    flags and no attempts (null, where the card says an empty list means no flag)."""
    from huggingface_hub import CommitOperationAdd

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(make_rows(0, 5), schema=pa.schema([OUTPUT_SCHEMA.field(n)
                                                                           for n in OLD_COLUMNS])), buf)
    client.api.create_commit(REPO, [CommitOperationAdd(f"data/{RUN}-w000-000000-000000.parquet", buf.getvalue())],
                             commit_message="0.1", repo_type="dataset")
    Writer(ckpt).parts(5, 5)  # keys 0-4 again (published by 0.1) and 5-9
    for part in list_parts(ckpt):  # as 0.1 wrote them
        table = pq.read_table(part.path)
        pq.write_table(table.select(OLD_COLUMNS).replace_schema_metadata(table.schema.metadata), part.path)
    assert client.push_pending(ckpt, RUN, 0) == 5
    schemas = [pq.read_schema(io.BytesIO(data)) for path, data in hub_stub.repo_files(REPO).items()
               if path.endswith(".parquet")]
    assert len(schemas) == 2 and all(s.equals(OUTPUT_SCHEMA) for s in schemas), schemas
    client.write_card(RUN_INFO, {})
    ds = load_snapshot(hub_stub, tmp_path)
    assert ds.num_rows == 10 and list(ds["caption_attempts"]) == [1] * 10
    assert None not in list(ds["caption_flags"])  # judged from their text, as the new rows' were
