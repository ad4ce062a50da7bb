"""Pushing a finished model or adapter folder to the Hugging Face hub (a trainer's --push-to-hub,
posttrain merge --push-to-hub)."""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import PosttrainError


def push_folder(folder: Path, repo: str) -> None:
    """Upload a model/adapter folder to the hub, with a one-line error when offline or unauthorised."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo,
                          ignore_patterns=["checkpoints/*", "tensorboard/*", "*.tmp*", ".*"])
    except Exception as e:
        raise PosttrainError(f"could not push to hub repo {repo!r} ({type(e).__name__}): check the network and "
                             f"that HF_TOKEN (or `hf auth login`) grants write access") from None
    print(f"pushed {folder} to https://huggingface.co/{repo}")
