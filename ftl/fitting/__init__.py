"""What train and finetune share: features and splits, checks, evaluation, plots, registration, progress, Ray Train helpers."""
