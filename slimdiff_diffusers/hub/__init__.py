"""Sharing slim models on the Hugging Face Hub: the model card and the uploads (needs huggingface_hub/diffusers).

    write_model_card(folder, pipe_or_model, ...)      # hub/card.py: README.md with ModelCard / ModelCardData
    push_output_folder(out_dir, repo_id, ...)         # hub/push.py: `slimdiff push OUT_DIR REPO_ID`
    push_pipeline_to_hub / push_model_to_hub          # what pipe.push_to_hub / slim_unet.push_to_hub call
"""
from .base_model import BaseModelInfo, resolve_base_model
from .card import SlimCardFacts, card_facts, collect_card_facts, write_model_card
from .push import push_model_to_hub, push_output_folder, push_pipeline_to_hub, validate_output_folder

__all__ = ["BaseModelInfo", "SlimCardFacts", "card_facts", "collect_card_facts", "push_model_to_hub",
           "push_output_folder", "push_pipeline_to_hub", "resolve_base_model", "validate_output_folder",
           "write_model_card"]
