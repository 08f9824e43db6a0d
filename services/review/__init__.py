"""Review: the specialist directory, matching, the reviewer's worklist and findings, the integrated report."""
