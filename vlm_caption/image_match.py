"""Is a captioned key's image the image the data dir holds under it? sha256 decides.

Keys name images by their place in a download (img2dataset's `key`), so the same key in another download is
another image: a checkpoint dir resumed or merged against another data dir would pair its captions with other
images, and a run of another data set pushing to a repo that holds a run of the same settings would take every
key that run published as done, and caption none of its own images under those keys. Before a run pairs
captions with images, or counts a key as captioned, it compares the images both sides name.

Most of the compared images differing is that mistake: one line, exit 2, before anything is captioned, written
or pushed. A few is a shard downloaded again whose server sent other bytes: a warning, their captions kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from . import store
from .errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class ImageMatch:
    """What one side captioned (key -> sha256 of its image), compared key by key with another side's images."""

    captioned: str  # who captioned them, e.g. "--checkpoint-dir X captioned", "the Hub run R of REPO published"
    remedy: str  # what to do when it is another data set
    images: Mapping[str, str | None]
    kept: str = "their captions are kept, of the image as it was"  # what becomes of a few that differ
    compared: int = 0  # keys both sides name an image for
    other: list[str] = field(default_factory=list)  # of those, keys whose images differ

    def see(self, key: str, sha256: str | None) -> None:
        """The other side holds the image `sha256` under `key` (each key once)."""
        known = self.images.get(key)
        if known and sha256:
            self.compared += 1
            if known != sha256:
                self.other.append(key)

    def see_all(self, images: Iterable[tuple[str, str | None]]) -> ImageMatch:
        for key, sha256 in images:
            self.see(key, sha256)
        return self

    def check(self, against: str, question: str = "is it the data set they were captioned from?") -> None:
        """Refuse (UsageError) when most compared images are other images in `against` ("--data-dir D"); warn
        when a few are."""
        if not self.other:
            return
        other = sorted(self.other)
        example = f"sha256 differs, e.g. key {other[0]}"
        if 2 * len(other) > self.compared:
            raise UsageError(f"{len(other)} of the {self.compared} images {self.captioned} are other images in "
                             f"{against} ({example}): {question} {self.remedy}")
        log.warning("%d of the %d images %s differ in %s (%s: a shard downloaded again?); %s", len(other),
                    self.compared, self.captioned, against, example, self.kept)


def parts_images(dirs: Iterable[Path]) -> dict[str, str | None]:
    """key -> sha256 of the image each readable part of `dirs` captioned it from (the unreadable ones are the
    business of whoever reads them next; a pusher reads its dir's itself: hub.HubClient.dir_images)."""
    images: dict[str, str | None] = {}
    for d in dirs:
        for part in store.list_parts(d):
            check = store.check_file(part.path, store.OUTPUT_SCHEMA)
            if check.keys is not None:
                images.update(zip(check.keys, check.sha256 or [None] * len(check.keys)))
    return images


def dir_match(dirs: str | Path, images: Mapping[str, str | None]) -> ImageMatch:
    """What checkpoint dir(s) `dirs` ("--checkpoint-dir X", say) captioned."""
    return ImageMatch(f"{dirs} captioned", "Another data set takes a --checkpoint-dir of its own", images)


def hub_match(repo_id: str, run_id: str, images: Mapping[str, str | None],
              remedy: str = "Another data set takes a --hf-repo of its own: in this one, a run of these settings "
                            "counts those keys as captioned",
              kept: str = "their published captions stand, of the image as it was, and are not made again"
              ) -> ImageMatch:
    """What the Hub run `run_id` of `repo_id` published (hub_index.Snapshot.images), as a run sees it."""
    return ImageMatch(f"the Hub run {run_id} of {repo_id} published", remedy, images, kept)
