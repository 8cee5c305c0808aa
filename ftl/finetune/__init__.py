"""Fine-tuning (`ftl finetune`): LP-FT of chosen backbone blocks on Ray Train, registered as a new image model.

blocks: which blocks train, the cut, lr groups · network: the split backbone + head · probes: the
probe it starts from · data: images (or the cached prefix) through Ray Data · loop: the Ray Train
worker loop · trainer: the driver's side of it · stage: `run(wf)`, MLflow and registration.
"""
