"""`ftl train` and `ftl sweep`: heads fitted on extracted features, evaluated and registered."""
