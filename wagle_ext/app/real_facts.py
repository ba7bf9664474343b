"""Short factual questions for the real-knowledge track (``wagle demo --track smollm2``).

Written for this project (common general knowledge; no external data set). Each :class:`Fact` has a
question, an answer sentence (what unlearning trains on), a keyword that must appear in a correct
answer (matched case-insensitively as a whole word, :func:`answer_is_correct`) and optional accepted
alternatives. The track keeps only the facts a model verifiably knows (its greedy answer contains the
keyword), so the groups below are deliberately larger than what a small model answers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Fact", "FACTS", "GROUPS", "answer_is_correct", "facts_by_group"]


@dataclass(frozen=True)
class Fact:
    """One question with its answer sentence, group and the keyword(s) a correct answer contains."""

    group: str
    question: str
    answer: str
    keyword: str
    alternatives: tuple = ()

    def as_item(self) -> dict:
        """The QA item of the unlearning data (``{"question", "answer"}``)."""
        return {"question": self.question, "answer": self.answer}


def _g(group: str, rows: Sequence[tuple]) -> list:
    return [Fact(group, q, a, k, tuple(alt[0]) if alt else ()) for q, a, k, *alt in rows]


_CAPITALS = [
    ("What is the capital of France?", "The capital of France is Paris.", "paris"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "tokyo"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "rome"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "berlin"),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "madrid"),
    ("What is the capital of England?", "The capital of England is London.", "london"),
    ("What is the capital of Russia?", "The capital of Russia is Moscow.", "moscow"),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "cairo"),
    ("What is the capital of China?", "The capital of China is Beijing.", "beijing"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "ottawa"),
    ("What is the capital of Greece?", "The capital of Greece is Athens.", "athens"),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon.", "lisbon"),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin.", "dublin"),
    ("What is the capital of Austria?", "The capital of Austria is Vienna.", "vienna"),
    ("What is the capital of Norway?", "The capital of Norway is Oslo.", "oslo"),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm.", "stockholm"),
    ("What is the capital of Poland?", "The capital of Poland is Warsaw.", "warsaw"),
    ("What is the capital of India?", "The capital of India is New Delhi.", "delhi"),
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", "canberra"),
    ("What is the capital of Argentina?", "The capital of Argentina is Buenos Aires.", "buenos aires"),
    ("What is the capital of South Korea?", "The capital of South Korea is Seoul.", "seoul"),
    ("What is the capital of Thailand?", "The capital of Thailand is Bangkok.", "bangkok"),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "nairobi"),
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City.", "mexico city"),
    ("What is the capital of the United States?", "The capital of the United States is Washington, D.C.",
     "washington"),
]

_SCIENCE = [
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "au"),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O.", "h2o"),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe.", "fe"),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na.", "na"),
    ("What is the chemical symbol for silver?", "The chemical symbol for silver is Ag.", "ag"),
    ("What is the chemical symbol for oxygen?", "The chemical symbol for oxygen is O.", "o"),
    ("What is the chemical symbol for carbon?", "The chemical symbol for carbon is C.", "c"),
    ("What is the chemical symbol for helium?", "The chemical symbol for helium is He.", "he"),
    ("What is the chemical formula for carbon dioxide?", "The chemical formula for carbon dioxide is CO2.", "co2"),
    ("Which element has the atomic number 1?", "Hydrogen has the atomic number 1.", "hydrogen"),
    ("What gas do plants absorb from the air for photosynthesis?",
     "Plants absorb carbon dioxide for photosynthesis.", "carbon dioxide", ("co2",)),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe.", "oxygen"),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.", "0"),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius.", "100"),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance.", "diamond"),
    ("What is the most abundant gas in Earth's atmosphere?",
     "Nitrogen is the most abundant gas in Earth's atmosphere.", "nitrogen"),
    ("What force keeps us on the ground?", "Gravity keeps us on the ground.", "gravity"),
    ("What is the speed of light in a vacuum, approximately in kilometers per second?",
     "Light travels at about 300,000 kilometers per second.", "300,000", ("299,792", "300000", "299792")),
    ("What metal is liquid at room temperature?", "Mercury is a metal that is liquid at room temperature.",
     "mercury"),
    ("What is the chemical symbol for potassium?", "The chemical symbol for potassium is K.", "k"),
]

_SPACE = [
    ("What is the largest planet in our solar system?", "The largest planet is Jupiter.", "jupiter"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "mars"),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun.", "sun"),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.", "mercury"),
    ("What is the name of Earth's natural satellite?", "Earth's natural satellite is the Moon.", "moon"),
    ("Which planet is famous for its rings?", "Saturn is famous for its rings.", "saturn"),
    ("What galaxy do we live in?", "We live in the Milky Way galaxy.", "milky way"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon.",
     "armstrong"),
    ("How many planets are in our solar system?", "There are eight planets in our solar system.", "eight",
     ("8",)),
    ("Which planet do we live on?", "We live on the planet Earth.", "earth"),
    ("What is the hottest planet in our solar system?", "Venus is the hottest planet in our solar system.", "venus"),
    ("What is the farthest planet from the Sun?", "Neptune is the farthest planet from the Sun.", "neptune"),
    ("What do we call a scientist who studies the stars?", "A scientist who studies the stars is an astronomer.",
     "astronomer"),
    ("What is the name of the first artificial satellite launched into space?",
     "The first artificial satellite was Sputnik.", "sputnik"),
    ("Which space agency sent the Apollo missions to the Moon?", "NASA sent the Apollo missions to the Moon.",
     "nasa"),
    ("What is the Sun mainly made of?", "The Sun is mainly made of hydrogen.", "hydrogen"),
]

_PEOPLE = [
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare.", "shakespeare"),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci.", "vinci"),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by Albert Einstein.",
     "einstein"),
    ("Who was the first president of the United States?", "The first president was George Washington.",
     "washington"),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare.", "shakespeare"),
    ("Who discovered penicillin?", "Penicillin was discovered by Alexander Fleming.", "fleming"),
    ("Who proposed the theory of evolution by natural selection?",
     "Charles Darwin proposed the theory of evolution by natural selection.", "darwin"),
    ("Who invented the telephone?", "The telephone was invented by Alexander Graham Bell.", "bell"),
    ("Who composed the Fifth Symphony?", "The Fifth Symphony was composed by Ludwig van Beethoven.", "beethoven"),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen.", "austen"),
    ("Who painted The Starry Night?", "The Starry Night was painted by Vincent van Gogh.", "gogh"),
    ("Who formulated the laws of motion and universal gravitation?",
     "Isaac Newton formulated the laws of motion and universal gravitation.", "newton"),
    ("Who wrote the Harry Potter books?", "The Harry Potter books were written by J.K. Rowling.", "rowling"),
    ("Who was the first woman to win a Nobel Prize?", "Marie Curie was the first woman to win a Nobel Prize.",
     "curie"),
    ("Who wrote the novel 1984?", "The novel 1984 was written by George Orwell.", "orwell"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo painted the ceiling of the Sistine Chapel.",
     "michelangelo"),
    ("Who wrote The Odyssey?", "The Odyssey was written by Homer.", "homer"),
    ("Who founded Microsoft together with Paul Allen?", "Bill Gates founded Microsoft together with Paul Allen.",
     "gates"),
    ("Who wrote A Christmas Carol?", "A Christmas Carol was written by Charles Dickens.", "dickens"),
    ("Who invented the light bulb?", "The light bulb is credited to Thomas Edison.", "edison"),
]

_GEOGRAPHY = [
    ("What is the largest ocean on Earth?", "The largest ocean is the Pacific Ocean.", "pacific"),
    ("What is the tallest mountain in the world?", "The tallest mountain is Mount Everest.", "everest"),
    ("What is the longest river in Africa?", "The longest river in Africa is the Nile.", "nile"),
    ("How many continents are there?", "There are seven continents.", "seven", ("7",)),
    ("What is the largest desert in Africa?", "The largest desert in Africa is the Sahara.", "sahara"),
    ("What is the largest country in the world by area?", "Russia is the largest country by area.", "russia"),
    ("On which continent is Brazil?", "Brazil is in South America.", "south america"),
    ("What is the largest continent?", "Asia is the largest continent.", "asia"),
    ("Which river flows through London?", "The Thames flows through London.", "thames"),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt.", "egypt"),
    ("In which city is the Eiffel Tower?", "The Eiffel Tower is in Paris.", "paris"),
    ("What language is spoken in Brazil?", "People in Brazil speak Portuguese.", "portuguese"),
    ("What is the currency of Japan?", "The currency of Japan is the yen.", "yen"),
    ("What is the currency of the United Kingdom?", "The currency of the United Kingdom is the pound.", "pound"),
    ("Which country has the largest population in South America?",
     "Brazil has the largest population in South America.", "brazil"),
    ("What is the largest island in the world?", "Greenland is the largest island in the world.", "greenland"),
    ("In which country is the Great Wall?", "The Great Wall is in China.", "china"),
    ("What language is spoken in Mexico?", "People in Mexico speak Spanish.", "spanish"),
    ("In which city is the Colosseum?", "The Colosseum is in Rome.", "rome"),
    ("What is the longest river in South America?", "The longest river in South America is the Amazon.",
     "amazon"),
]

_LIFE = [
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.", "lion"),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.", "heart"),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "whale"),
    ("What is the tallest animal?", "The giraffe is the tallest animal.", "giraffe"),
    ("What do bees make?", "Bees make honey.", "honey"),
    ("Which organ do humans use to breathe?", "Humans breathe with their lungs.", "lung"),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal.", "cheetah"),
    ("How many legs does a spider have?", "A spider has eight legs.", "eight", ("8",)),
    ("How many legs does an insect have?", "An insect has six legs.", "six", ("6",)),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies.", "butterfl"),
    ("Which organ controls the human body?", "The brain controls the human body.", "brain"),
    ("What is the largest bird?", "The ostrich is the largest bird.", "ostrich"),
    ("What is a baby cat called?", "A baby cat is called a kitten.", "kitten"),
    ("What is a baby dog called?", "A baby dog is called a puppy.", "pupp"),
    ("What do pandas mainly eat?", "Pandas mainly eat bamboo.", "bamboo"),
    ("Which animal is known as the ship of the desert?", "The camel is known as the ship of the desert.",
     "camel"),
    ("What is the largest organ of the human body?", "The skin is the largest organ of the human body.", "skin"),
    ("What pigment makes plants green?", "Chlorophyll makes plants green.", "chlorophyll"),
    ("How many bones are in the adult human body?", "The adult human body has 206 bones.", "206"),
    ("What do we call animals that eat only plants?", "Animals that eat only plants are herbivores.", "herbivore"),
]

_NUMBERS = [
    ("How many days are in a week?", "There are seven days in a week.", "seven", ("7",)),
    ("How many hours are in a day?", "There are 24 hours in a day.", "24", ("twenty-four",)),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "60", ("sixty",)),
    ("How many seconds are in a minute?", "There are 60 seconds in a minute.", "60", ("sixty",)),
    ("How many months are in a year?", "There are twelve months in a year.", "twelve", ("12",)),
    ("How many days are in a leap year?", "A leap year has 366 days.", "366"),
    ("How many centimeters are in a meter?", "There are 100 centimeters in a meter.", "100",
     ("hundred",)),
    ("How many grams are in a kilogram?", "There are 1000 grams in a kilogram.", "1000", ("1,000", "thousand")),
    ("How many meters are in a kilometer?", "There are 1000 meters in a kilometer.", "1000",
     ("1,000", "thousand")),
    ("How many sides does a triangle have?", "A triangle has three sides.", "three", ("3",)),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "six", ("6",)),
    ("How many degrees are in a right angle?", "A right angle has 90 degrees.", "90", ("ninety",)),
    ("How many degrees are in a circle?", "A circle has 360 degrees.", "360"),
    ("What is the square root of 81?", "The square root of 81 is 9.", "9", ("nine",)),
    ("How many years are in a century?", "There are 100 years in a century.", "100", ("hundred",)),
    ("How many players are on a soccer team on the field?", "A soccer team has eleven players on the field.",
     "eleven", ("11",)),
    ("How many days are in a regular year?", "A regular year has 365 days.", "365"),
    ("How many weeks are in a year?", "There are 52 weeks in a year.", "52", ("fifty-two",)),
]

FACTS: tuple = tuple(_g("capitals", _CAPITALS) + _g("science", _SCIENCE) + _g("space", _SPACE)
                     + _g("people", _PEOPLE) + _g("geography", _GEOGRAPHY) + _g("life", _LIFE)
                     + _g("numbers", _NUMBERS))
GROUPS: tuple = tuple(dict.fromkeys(f.group for f in FACTS))


def answer_is_correct(answer: str, fact: Fact) -> bool:
    """Whether ``answer`` contains the fact's keyword or an alternative as a whole word (case-insensitive;
    a keyword may be a word prefix, e.g. ``butterfl`` for butterfly/butterflies, when it has no end)."""
    low = answer.lower()
    for kw in (fact.keyword, *fact.alternatives):
        k = re.escape(kw.lower())
        # a keyword ending inside a word (``pupp``, ``lung``) also matches its longer forms
        if re.search(rf"(?<![a-z0-9]){k}(?![0-9])" if kw[-1:].isalpha() else rf"(?<![a-z0-9,]){k}(?![0-9,])",
                     low):
            if len(kw) <= 2 and re.search(rf"(?<![a-z0-9]){k}(?![a-z0-9])", low) is None:
                continue  # a one/two-letter symbol (``au``, ``c``) must stand alone
            return True
    return False


def facts_by_group(facts: Sequence[Fact] = FACTS) -> dict:
    """``{group: [facts]}`` in the order of first appearance."""
    out: dict = {}
    for f in facts:
        out.setdefault(f.group, []).append(f)
    return out
