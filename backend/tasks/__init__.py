"""The three questions the backend answers (classify, rank, localize) and what they share."""
