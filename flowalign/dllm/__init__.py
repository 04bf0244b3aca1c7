"""Masked-diffusion language models (LLaDA, Dream, any Hugging Face masked LM with a mask token).

``model`` loads them, ``sampling`` decodes with recorded trajectories, ``logprob`` estimates
per-token log-likelihoods, ``tasks`` scores completions with verifiable rewards, and
``flowalign.recipes.dllm_rl`` trains them with group-relative policy gradients.
"""
