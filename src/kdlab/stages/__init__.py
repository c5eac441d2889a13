"""The stages of a study, in the order `Study.run` does them: data, teacher, students, cache, sweep (with
selection). Each is a module of functions over the study; each writes its artifacts under the study folder,
so a later command, process or machine picks them up from there."""
