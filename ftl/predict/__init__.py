"""`ftl predict`: a registered image model applied to a folder or manifest of images."""
