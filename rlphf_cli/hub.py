"""Hub names (`org/name`) for models and datasets, through Hugging Face's own cache.

A hub name resolves the way transformers and datasets resolve it: the local cache ($HF_HOME/hub,
filled by `hf download` or an earlier online run) and, unless HF_HUB_OFFLINE=1, the hub. What this
module adds: one clear line when a name is neither cached nor reachable, and offline hub datasets
read from the hub cache. (datasets 3-5 look only in their own processed Arrow cache,
$HF_HOME/datasets/<owner>___<name>/, when offline, not in the snapshot `hf download` fetched:
the usual way to bring data to a cluster's offline compute nodes.)
"""

from __future__ import annotations

from pathlib import Path

from rlphf_cli.errors import InputError


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def _unavailable(kind: str, name: str) -> str:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    command = f"hf download {name}" + (" --repo-type dataset" if kind == "dataset" else "")
    return (f"{kind} '{name}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
            f"fetch it where there is network: {command}")


def require_model(name: str, revision: str | None = None) -> None:
    """A local folder passes; a hub name must have its config.json in the cache or on the hub (fetched the
    way from_pretrained fetches it), else InputError in one line."""
    if is_local(name):
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        hf_hub_download(name, "config.json", revision=revision)
    except LocalEntryNotFoundError:
        raise InputError(_unavailable("model", name)) from None
    except GatedRepoError:
        raise InputError(f"model '{name}' is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"model '{name}': no such local folder or hub model (a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"model '{name}': no revision '{revision}' on the Hugging Face Hub") from None
    except EntryNotFoundError:
        raise InputError(f"model '{name}' has no config.json: not a transformers model") from None
    except HFValidationError:
        raise InputError(f"model '{name}': no such local folder, and not a hub name (org/name)") from None


def load_dataset_split(name: str, split: str):
    """datasets.load_dataset(name, split=split); when the hub cannot be reached, the snapshot of the
    dataset in the hub cache."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            return datasets.load_dataset(name, split=split)
        except ConnectionError:
            try:
                folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
            except LocalEntryNotFoundError:
                raise InputError(_unavailable("dataset", name)) from None
            return datasets.load_dataset(folder, split=split)
    except DatasetNotFoundError as exc:
        raise InputError(f"dataset '{name}': {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # an unknown split names the ones there are
        raise InputError(f"dataset '{name}': {str(exc).splitlines()[0]}") from None
