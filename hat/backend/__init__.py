"""Hardware backends; `j5` holds the J5 ("bayes") arithmetic profile and integer primitives."""
