"""Phase-switched, per-source data: the phases file, source streams, blending schedule and FIM."""
