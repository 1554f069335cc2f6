"""Training machinery shared by every trained model: settings, augmentation, the epoch loop."""
