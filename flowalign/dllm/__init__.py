"""Masked-diffusion language models (LLaDA, Dream, any Hugging Face masked LM with a mask token).

``model`` loads them (LoRA, Dream's shifted logits, ``trust_remote_code``), ``sampling`` decodes
with recorded trajectories, ``logprob`` estimates per-token log-likelihoods, ``tasks`` scores
completions with verifiable rewards (``sandbox`` runs code under limits), ``pretrain`` holds the
masked-diffusion pretraining loss, ``algorithms`` the pure pieces of the RL methods (whose units
are in :mod:`flowalign.algorithms`), ``config`` the run schema, and ``flowalign.recipes.dllm_rl``
trains them with group-relative policy gradients.
"""
