"""Architecture search over distilled neighbourhoods: the library of distilled candidates
(library), the search (search) and the exact budgeted choice it makes (selection)."""
